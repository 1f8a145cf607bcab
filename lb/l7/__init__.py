"""L7 proxy: listener rules, HTTP protocol, upstream pools and workers."""
