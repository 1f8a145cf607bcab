"""lb: a kernel-assisted load balancer."""
