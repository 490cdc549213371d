#!/bin/sh
# sertcp on other CPUs: debootstrap Debian root filesystems (armhf and
# mipsel by default) and run tests/qemu_smoke.py inside each under
# qemu-user.  Not in CI: it downloads a few hundred MB from Debian's mirror
# and emulation is slow (minutes per architecture).  Needs root,
# debootstrap and qemu-user-static, whose binfmt handlers it registers in
# the kernel (binfmt_misc) if they are not there.
#
#   sh tests/qemu_smoke.sh [ARCH ...]
#   SUITE=bookworm MIRROR=http://deb.debian.org/debian WORK=/var/tmp/sertcp-qemu
set -eu
here=$(cd "$(dirname "$0")/.." && pwd)
suite=${SUITE:-bookworm}
mirror=${MIRROR:-http://deb.debian.org/debian}
work=${WORK:-/var/tmp/sertcp-qemu}
[ $# -gt 0 ] || set -- armhf mipsel

command -v debootstrap >/dev/null && command -v qemu-mipsel-static >/dev/null ||
    { echo "needs: apt-get install debootstrap qemu-user-static binfmt-support" >&2; exit 2; }
[ -e /proc/sys/fs/binfmt_misc/status ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
ls /proc/sys/fs/binfmt_misc | grep -q qemu- || update-binfmts --enable

status=0
for arch in "$@"; do
    root=$work/$arch
    if [ ! -x "$root/usr/bin/python3" ]; then
        echo "== $arch: debootstrap $suite into $root"
        debootstrap --arch="$arch" --variant=minbase --include=python3,python3-serial \
            "$suite" "$root" "$mirror" >"$work/$arch.debootstrap.log" 2>&1 ||
            { echo "debootstrap failed: $work/$arch.debootstrap.log" >&2; status=1; continue; }
    fi
    cp "$here/sertcp.py" "$here/sertcp.ini.example" "$here/tests/qemu_smoke.py" "$root/tmp/"
    mount -t proc proc "$root/proc"
    mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
    ln -sf pts/ptmx "$root/dev/ptmx"
    echo "== $arch"
    chroot "$root" python3 /tmp/qemu_smoke.py || status=1
    umount "$root/dev/pts" "$root/proc"
done
exit $status
