"""L7 proxy: listener rules, HTTP protocol, upstream pools and workers."""

from lb.l7 import native

# The hot modules compiled by mypyc when deploy/install.sh built them from
# these sources (lb.l7.native); None when in use, else why not.
NOT_COMPILED = native.activate(__path__)
