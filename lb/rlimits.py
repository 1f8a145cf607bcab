"""Open files: the soft limit raised to the hard one, and how much of it to keep free.

systemd, like most of Linux, starts a service with 1024 open files (soft)
unless the unit says otherwise: ~2,000 idle connections then took lb down
(every accept failed, and uvloop closes a listener whose accept fails
with EMFILE). deploy/lb.service sets LimitNOFILE; the daemon and every L7
worker also raise their soft limit to the hard one at start (the soft
default stays 1024 for programs that select(): the workers use epoll only;
the daemon, whose netlink library does call select(), holds a few dozen
descriptors), and a worker keeps :func:`reserve` descriptors free for
accepting, upstream connections and its own files (lb.l7.worker sheds idle
connections to keep them free).
"""

from __future__ import annotations

import logging
import os
import resource

log = logging.getLogger("lb.rlimits")

# A hard limit below this is worth a warning: every worker then holds fewer
# than ~3,500 connections before it sheds idle ones.
LOW_HARD_LIMIT = 4096


def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # infinity above fs.nr_open: take nr_open
        with open("/proc/sys/fs/nr_open") as f:
            hard = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_and_report() -> int:
    """raise_nofile(), logged (a warning when the hard limit is low); returns the limit."""
    before, now = raise_nofile()
    if now < LOW_HARD_LIMIT:
        log.warning("open files: the hard limit is %d; each L7 worker sheds idle connections beyond about %d "
                    "(raise LimitNOFILE in the unit, or ulimit -Hn)", now, now - reserve(now))
    elif before != now:
        log.info("open files: soft limit raised from %d to %d", before, now)
    return now


def nofile_limit() -> int:
    """The soft limit on open files now."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    return soft


def reserve(limit: int) -> int:
    """Descriptors an L7 worker keeps free below `limit`: for a burst of
    accepts (uvloop accepts a whole backlog at once), the upstream connections
    of the requests they bring, and its own files. An eighth, 64 to 1024."""
    return min(1024, max(64, limit // 8))


def open_fds() -> int | None:
    """Descriptors this process has open (None if it cannot even count them)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the directory's own descriptor
    except OSError:
        return None
