#!/bin/sh
# The gateway image of `make vm-test`: Debian bookworm with systemd as PID 1, Debian's generic
# kernel (it has SocketCAN and 9p; the -cloud kernel has neither), can-utils, mosquitto and
# python3, and a unit that runs the payload's guest.py at boot with its results on ttyS1.
# The agent is not in it: the guest installs it with deploy/install.sh at every run.
#
# Usage: tests/vm/image.sh CACHE_DIR   (as root). Prints the folder that holds vmlinuz,
# initrd.img and rootfs.img: CACHE_DIR/image-KEY, KEY a hash of this script and the mirror,
# so an edit here builds a new image and an unchanged one is reused as it is.
set -eu

CACHE=${1:?usage: image.sh CACHE_DIR}
SUITE=bookworm
# No procps: a minimal Debian has no /bin/kill, and the unit must work without it.
PACKAGES=systemd-sysv,udev,kmod,iproute2,can-utils,mosquitto,python3,python3-venv
PACKAGES=$PACKAGES,initramfs-tools,linux-image-amd64

if [ -z "${VM_MIRROR:-}" ]; then
    # The host's own Debian mirror (deb822 or one-line sources), else Debian's.
    VM_MIRROR=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE 'https?://[^ ]+/debian/?( |$)' |
        grep -v security | head -n 1 | tr -d ' ') || true
    VM_MIRROR=${VM_MIRROR:-http://deb.debian.org/debian}
fi

KEY=$({ cat "$0"; echo "$VM_MIRROR"; } | sha256sum | cut -c1-16)
IMAGE=$CACHE/image-$KEY
if [ -f "$IMAGE/rootfs.img" ]; then
    echo "$IMAGE"
    exit 0
fi

WORK=$CACHE/build.$$
# --one-file-system: a killed debootstrap may leave its mounts (/proc, /dev) in the tree.
trap 'rm -rf --one-file-system "$WORK"' EXIT
trap 'exit 130' INT TERM
mkdir -p "$WORK/rootfs" "$WORK/image" "$CACHE/debs"
R=$WORK/rootfs

# Before debootstrap, so that the kernel's postinst builds a small initramfs (the drivers
# to mount the root only: 6 MB in 2 s instead of 35 MB in 20 s). The rest are modules that
# the booted system loads from its root.
mkdir -p "$R/etc/initramfs-tools/conf.d" "$R/usr/share/initramfs-tools/modules.d"
echo MODULES=list >"$R/etc/initramfs-tools/conf.d/vm-test"
printf '%s\n' virtio_pci virtio_blk ext4 >"$R/usr/share/initramfs-tools/modules.d/vm-test"
echo '/dev/vda / ext4 rw,relatime 0 1' >"$R/etc/fstab"

echo "image.sh: debootstrap $SUITE from $VM_MIRROR" >&2
debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$CACHE/debs" \
    "$SUITE" "$R" "$VM_MIRROR" >"$WORK/debootstrap.log" 2>&1 || {
    tail -n 30 "$WORK/debootstrap.log" >&2
    echo "image.sh: debootstrap failed" >&2
    exit 1
}

# At boot: mount the host's folders (payload read-only, out writable) and run guest.py.
mkdir -p "$R/usr/local/lib/vm-test"
cat >"$R/usr/local/lib/vm-test/start" <<'EOF'
#!/bin/sh
exec >/dev/ttyS1 2>&1
modprobe 9pnet_virtio
mkdir -p /mnt/payload /mnt/out
mount -t 9p -o trans=virtio,version=9p2000.L,ro payload /mnt/payload || exit 1
mount -t 9p -o trans=virtio,version=9p2000.L out /mnt/out || exit 1
exec python3 -u /mnt/payload/guest.py
EOF
chmod 755 "$R/usr/local/lib/vm-test/start"
cat >"$R/etc/systemd/system/vm-test.service" <<'EOF'
[Unit]
Description=make vm-test: the checks, then power off
SuccessAction=poweroff-force
FailureAction=poweroff-force
[Service]
# exec, not oneshot: the boot completes while the checks run, so that they can wait for it.
Type=exec
ExecStart=/usr/local/lib/vm-test/start
# A check that hangs fails the unit, which powers the VM off.
RuntimeMaxSec=1800
[Install]
WantedBy=multi-user.target
EOF
chroot "$R" systemctl enable --quiet vm-test.service
# Nothing of a normal machine's upkeep runs in the middle of a check; the agent starts
# when a check starts it.
chroot "$R" systemctl disable --quiet apt-daily.timer apt-daily-upgrade.timer \
    dpkg-db-backup.timer e2scrub_all.timer fstrim.timer getty@tty1.service 2>/dev/null || true
echo gateway >"$R/etc/hostname"
chroot "$R" passwd -d root >/dev/null

cp "$R"/boot/vmlinuz-* "$WORK/image/vmlinuz"
cp "$R"/boot/initrd.img-* "$WORK/image/initrd.img"
rm -f "$R"/var/cache/apt/archives/*.deb
# ext4 straight from the folder (no loop device, no mount), with room for the agent's
# virtual environment, its spool and the checks' files.
used=$(du -sm "$R" | cut -f1)
truncate -s $((used + 1536))M "$WORK/image/rootfs.img"
mkfs.ext4 -q -F -L gateway -d "$R" "$WORK/image/rootfs.img"
rm -rf "$IMAGE"
mv "$WORK/image" "$IMAGE"
echo "$IMAGE"
