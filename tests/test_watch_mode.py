"""Auto watch mode: inotify on local filesystems, polling where no events arrive (network and FUSE mounts)."""

from pathlib import Path

from heygem_daemon.fs.watcher import choose_mode, filesystem_type


def test_filesystem_type_is_the_one_of_the_deepest_mount_holding_the_path():
    assert filesystem_type(Path("/proc/self/status")) == "proc"
    assert filesystem_type(Path("/")) not in ("proc", "unknown")


def test_auto_mode_polls_on_network_and_fuse_mounts_and_listens_on_local_disks():
    assert [choose_mode("auto", t) for t in ("nfs4", "cifs", "fuse.sshfs", "ext4")] == \
        ["polling", "polling", "polling", "inotify"]
    assert choose_mode("inotify", "nfs4") == "inotify" and choose_mode("polling", "ext4") == "polling"
