"""lb: a kernel-assisted load balancer."""

# The one version: pyproject.toml reads it from here (`lb --version`, lb_build_info).
__version__ = "0.1.0"
