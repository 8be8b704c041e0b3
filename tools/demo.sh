#!/usr/bin/env bash
# The main job on a built-in default: copy real directory trees from this machine into a
# fresh buildatfs store and show what deduplication and compression saved.
#
# Everything lives under /var/tmp/buildatfs-demo/ (store/ and mnt/), which is recreated on
# every run. The trees are this Python's standard library, Debian's own copy of the Python
# standard library (a related tree, so chunks repeat), /usr/share/doc (text that compresses,
# with many identical copyright files), and finally a second copy of the standard library
# made inside the mount (every chunk repeats). After unmounting, the store is checked with
# fsck, mounted again, and every copied tree is compared with its source.
set -euo pipefail

repo_root=$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)
cd "$repo_root"

demo_dir=/var/tmp/buildatfs-demo
store=$demo_dir/store
mnt=$demo_dir/mnt
# Left out of the Python trees: installed packages (large, and not the standard library)
# and bytecode caches (which differ between the two interpreters).
excludes=(site-packages dist-packages __pycache__)

say() { printf '\n==> %s\n' "$*"; }
die() {
    echo "demo.sh: $*" >&2
    exit 1
}

# True if PATH is a mount point. Reads the mount table instead of calling stat(), which
# fails with ENOTCONN on a FUSE mount whose daemon has died.
is_mounted() {
    awk -v path="$1" '$5 == path { found = 1 } END { exit !found }' /proc/self/mountinfo
}

unmount() {
    local path=$1
    if timeout 300 buildatfs umount "$path"; then
        return 0
    fi
    echo "demo.sh: 'buildatfs umount $path' failed; detaching it with fusermount3 -uz." >&2
    fusermount3 -uz "$path"
}

mounted=0
on_exit() {
    local status=$?
    if ((mounted)) && is_mounted "$mnt"; then
        echo "demo.sh: stopped early; unmounting $mnt." >&2
        unmount "$mnt" || echo "demo.sh: could not unmount $mnt; run fusermount3 -uz $mnt." >&2
    fi
    if ((status != 0)); then
        echo "demo.sh: FAILED (exit code $status). The store is left in $store." >&2
    fi
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Print the number of regular files and the apparent size in MiB of a tree.
tree_summary() {
    local files bytes
    files=$(find "$1" -type f | wc -l)
    bytes=$(du -s --apparent-size --block-size=1 "$1" | cut -f1)
    echo "$files files, $((bytes / 1048576)) MiB"
}

# Copy a Python standard library into the mount, leaving out $excludes.
copy_python_tree() {
    local source=$1 target=$2 tar_excludes=() name
    for name in "${excludes[@]}"; do
        tar_excludes+=("--exclude=$name")
    done
    mkdir "$target"
    # The posix format keeps timestamps to the nanosecond.
    tar -C "$source" "${tar_excludes[@]}" --format=posix -cf - . | tar -C "$target" -xpf -
}

# List type, mode, owner, size, mtime (ns) and link target of every entry of a tree, with
# $excludes left out. Directory sizes differ between filesystems and are not listed.
list_metadata() {
    local prune=() name
    for name in "${excludes[@]}"; do
        prune+=(-name "$name" -o)
    done
    (cd "$1" && find . \( "${prune[@]}" -false \) -prune -o \
        \( -type d -printf '%p d %m %U:%G %T@\n' \) -o \
        -printf '%p %y %m %U:%G %s %T@ %l\n') | LC_ALL=C sort
}

# Compare a copy with its source, both the bytes of every file and the metadata.
verify_tree() {
    local source=$1 target=$2 diff_excludes=() name
    for name in "${excludes[@]}"; do
        diff_excludes+=(-x "$name")
    done
    diff -r --no-dereference "${diff_excludes[@]}" "$source" "$target" >/dev/null ||
        die "$target differs from $source (see: diff -r --no-dereference $source $target)."
    if ! diff <(list_metadata "$source") <(list_metadata "$target") >"$demo_dir/metadata.diff"; then
        head -n 20 "$demo_dir/metadata.diff" >&2
        die "metadata in $target differs from $source (all of it: $demo_dir/metadata.diff)."
    fi
    echo "    $target: same bytes and metadata as $source"
}

timed() {
    local label=$1 start=$SECONDS
    shift
    "$@" || die "$label failed."
    echo "    $label: $((SECONDS - start)) s"
}

say "Installing requirements (tools/setup.sh)"
bash tools/setup.sh || die "tools/setup.sh failed; its output is above."
[[ -c /dev/fuse ]] || die "/dev/fuse is missing; load the fuse module (modprobe fuse)."

say "Preparing a fresh $demo_dir"
if is_mounted "$mnt"; then
    echo "    unmounting $mnt, left mounted by an earlier run"
    unmount "$mnt" || die "cannot unmount $mnt; stop the process using it, then run again."
fi
if grep -qF " $demo_dir/" /proc/self/mountinfo; then
    die "something else is mounted under $demo_dir; unmount it first."
fi
rm -rf --one-file-system "$demo_dir"
mkdir -p "$mnt"

# The trees to copy: [name in the mount]=source. Debian's standard library is used only
# when it is not the running interpreter's own.
stdlib=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
debian_stdlib=$(printf '%s\n' /usr/lib/python3.[0-9]* | sort -V | tail -n 1)
[[ -f $stdlib/os.py ]] || die "cannot find the Python standard library (got '$stdlib')."
[[ -d /usr/share/doc ]] || die "/usr/share/doc is missing."
if [[ -n $debian_stdlib && -f $debian_stdlib/os.py &&
    $(readlink -f "$debian_stdlib") != $(readlink -f "$stdlib") ]]; then
    have_debian_stdlib=1
else
    have_debian_stdlib=0
fi

say "Creating the store and mounting it"
buildatfs init "$store" || die "buildatfs init $store failed."
mounted=1
buildatfs mount "$store" "$mnt" || die "buildatfs mount $store $mnt failed."
is_mounted "$mnt" || die "buildatfs mount returned but $mnt is not mounted."
echo "    $store is mounted at $mnt"

say "Copying trees through the mount"
echo "    python-stdlib     <- $stdlib (without ${excludes[*]})"
timed "python-stdlib" copy_python_tree "$stdlib" "$mnt/python-stdlib"
if ((have_debian_stdlib)); then
    echo "    debian-stdlib     <- $debian_stdlib (without ${excludes[*]})"
    timed "debian-stdlib" copy_python_tree "$debian_stdlib" "$mnt/debian-stdlib"
fi
echo "    usr-share-doc     <- /usr/share/doc"
timed "usr-share-doc" cp -a /usr/share/doc "$mnt/usr-share-doc"
echo "    python-stdlib-2   <- $mnt/python-stdlib (a copy inside the mount)"
timed "python-stdlib-2" cp -a "$mnt/python-stdlib" "$mnt/python-stdlib-2"
echo "    in total: $(tree_summary "$mnt")"

say "buildatfs stats $mnt (while mounted)"
buildatfs stats "$mnt" || die "buildatfs stats $mnt failed."

say "Unmounting"
timed "buildatfs umount" buildatfs umount "$mnt"
mounted=0
is_mounted "$mnt" && die "buildatfs umount returned but $mnt is still mounted."

say "buildatfs stats $store (after unmounting)"
buildatfs stats "$store" || die "buildatfs stats $store failed."
echo
echo "    the store takes $(du -sh "$store" | cut -f1) on disk"

say "buildatfs fsck $store"
fsck_status=0
buildatfs fsck "$store" || fsck_status=$?
((fsck_status == 0)) || die "buildatfs fsck found problems (exit code $fsck_status)."
echo "    no problems found"

say "Mounting again and comparing every tree with its source"
mounted=1
buildatfs mount "$store" "$mnt" || die "buildatfs mount $store $mnt failed on remount."
timed "verify python-stdlib" verify_tree "$stdlib" "$mnt/python-stdlib"
if ((have_debian_stdlib)); then
    timed "verify debian-stdlib" verify_tree "$debian_stdlib" "$mnt/debian-stdlib"
fi
timed "verify usr-share-doc" verify_tree /usr/share/doc "$mnt/usr-share-doc"
timed "verify python-stdlib-2" verify_tree "$stdlib" "$mnt/python-stdlib-2"
buildatfs umount "$mnt" || die "buildatfs umount $mnt failed."
mounted=0

say "Done: the store is in $store; run this script again to start over."
