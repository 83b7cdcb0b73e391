#!/bin/sh
# A base image made from Debian packages alone, for machines that reach no container
# registry: mmdebstrap writes a bookworm root filesystem (python3, python3-venv, tini,
# ca-certificates and the minimal base) into a tarball, buildah imports it as an image.
#   debian-base.sh IMAGE_NAME WORKDIR
# Needs root, mmdebstrap and buildah (the Makefile installs them with apt-get).
set -eu
image=${1:?image name}
work=${2:?work folder}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
mkdir -p "$work"
tarball="$work/debian-$suite-python.tar"

# Docs, man pages and translations are left out (what the slim Debian images drop).
nice -n 10 mmdebstrap --variant=minbase --mode=root --format=tar \
	--include=python3,python3-venv,tini,ca-certificates \
	--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
	--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
	--dpkgopt='path-exclude=/usr/share/locale/*' \
	--customize-hook='rm -rf "$1"/var/cache/apt/* "$1"/var/lib/apt/lists/* "$1"/var/log/*.log' \
	"$suite" "$tarball" \
	"deb $mirror $suite main" "deb $mirror $suite-updates main" \
	"deb $security $suite-security main"

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add "$ctr" "$tarball" /
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
	--cmd /bin/sh --label "org.opencontainers.image.title=debian-$suite-python" \
	--label "org.opencontainers.image.description=Debian $suite: python3, python3-venv, tini, ca-certificates (mmdebstrap)" \
	"$ctr"
buildah commit --rm "$ctr" "$image"
trap - EXIT
rm -f "$tarball"
