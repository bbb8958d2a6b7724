#!/usr/bin/env bash
# Build gpud_VERSION_ARCH.deb: gpud in its own virtualenv under /opt/gpud, /usr/bin/gpud, the systemd
# unit, the sysusers.d entry and /etc/gpud/gpud.toml (a conffile).
#
#   packaging/build-deb.sh [-o OUTDIR] [--wheelhouse DIR] [--python PYTHON]
#
#   -o OUTDIR          where the .deb goes (default: dist/)
#   --wheelhouse DIR   install gpud's dependencies from wheels in DIR only (offline: pip --no-index);
#                      without it they come from the package index pip is configured for (PyPI)
#   --python PYTHON    the interpreter the venv is built on and bound to (default /usr/bin/python3).
#                      The package then depends on that Debian python3.X package; the target machine
#                      needs the same Python minor version at the same path.
#
# Needs: bash, dpkg-deb, that Python with its venv module (Debian: python3-venv), and readlink/sed/du.
# Env: DEB_MAINTAINER ("Name <mail>"), DEB_COMPRESS (gzip by default: several times faster than xz for
# a venv, and every dpkg reads it).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUTDIR=$ROOT/dist
WHEELHOUSE=
PYTHON=/usr/bin/python3
[ -x "$PYTHON" ] || PYTHON=$(command -v python3)

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build-deb: $*" >&2; exit 1; }

while [ $# -gt 0 ]; do
    case "$1" in
        -o) OUTDIR=$2; shift 2 ;;
        --wheelhouse) WHEELHOUSE=$(cd "$2" && pwd); shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
done

command -v dpkg-deb >/dev/null || die "dpkg-deb is missing (Debian/Ubuntu: apt-get install dpkg)."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
    || die "$PYTHON is older than Python 3.10, which gpud needs."
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
PYREAL=$(readlink -f "$(command -v "$PYTHON")")
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/gpud/__init__.py")
[ -n "$VERSION" ] || die "cannot read __version__ from gpud/__init__.py."
ARCH=$(dpkg --print-architecture 2>/dev/null || echo amd64)  # the venv holds compiled wheels (uvloop…)
MAINTAINER=${DEB_MAINTAINER:-gpud maintainers <gpud@localhost>}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpud-deb.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
STAGING=$WORK/root
VENV=$STAGING/opt/gpud
PIP_OPTS=(--disable-pip-version-check --no-input)
if [ -n "$WHEELHOUSE" ]; then
    PIP_OPTS+=(--no-index --find-links "$WHEELHOUSE")
fi

echo "build-deb: gpud $VERSION for $ARCH on Python $PYVER ($PYREAL)"

# 1. The venv, created where it will live inside the staging root. It is relocated below by rewriting
#    the staging prefix; its bin/python links to the system interpreter, which is what we want: Debian's
#    security updates of python3.X apply to gpud too.
"$PYTHON" -m venv "$VENV" || die "$PYTHON -m venv failed (Debian/Ubuntu: apt-get install python$PYVER-venv)."

# 2. A wheel of gpud, built from a copy of the sources so that the checkout gets no build/ or egg-info.
mkdir -p "$WORK/src" "$WORK/dist"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/gpud" "$WORK/src/"
find "$WORK/src" -name __pycache__ -prune -exec rm -rf {} +
"$VENV/bin/python" -m pip wheel -q "${PIP_OPTS[@]}" --no-deps -w "$WORK/dist" "$WORK/src" \
    || die "building the gpud wheel failed; see pip's output above."

# 3. gpud and its dependencies. Bytecode is compiled in step 4, with the final paths in it.
"$VENV/bin/python" -m pip install -q "${PIP_OPTS[@]}" --no-compile --no-warn-script-location \
    "$WORK"/dist/gpud-*.whl || die "installing gpud's dependencies failed; see pip's output above."
# Python 3.11's ensurepip also seeds setuptools, which nothing of gpud uses (9 MB); and the record of the
# wheel's temporary path would make `pip freeze` name a file that is gone.
"$VENV/bin/python" -m pip uninstall -q -y --disable-pip-version-check setuptools >/dev/null 2>&1 || true
rm -f "$VENV"/lib/python*/site-packages/gpud-*.dist-info/direct_url.json

# 4. Relocate to /opt/gpud: scripts' #! lines, activate scripts and pyvenv.cfg name the staging path.
#    (/usr/bin/gpud does not depend on any #! line, see below; this keeps /opt/gpud/bin/pip usable.)
grep -rlIF "$VENV" "$VENV" | while IFS= read -r file; do
    sed -i "s|$VENV|/opt/gpud|g" "$file"
done
find "$VENV" -name __pycache__ -prune -exec rm -rf {} +
# /opt is read-only for the service (ProtectSystem=strict): ship the bytecode, compiled with the paths
# it will have (-s strips the staging root, -p puts "/" in front) so tracebacks name real files.
"$VENV/bin/python" -m compileall -q -j 0 -s "$STAGING" -p / "$VENV/lib" >/dev/null \
    || die "compiling the venv's bytecode failed."

# 5. The command. It finds the venv relative to itself, so the same file works installed
#    (/usr/bin/../../opt/gpud) and unpacked anywhere (DIR/usr/bin/gpud -> DIR/opt/gpud, which is how
#    tests/test_packaging.py runs it). The venv's python runs the console script explicitly: the #! line
#    does not matter, and unlike `python -m gpud` the current directory does not land on sys.path.
install -d "$STAGING/usr/bin"
cat > "$STAGING/usr/bin/gpud" <<'EOF'
#!/bin/sh
# gpud, from its private virtualenv (installed by the gpud package).
self=$(readlink -f "$0")
venv=${self%/usr/bin/*}/opt/gpud
exec "$venv/bin/python" "$venv/bin/gpud" "$@"
EOF
chmod 0755 "$STAGING/usr/bin/gpud"

# 6. systemd, sysusers, config, docs.
install -D -m 0644 "$ROOT/contrib/systemd/gpud.service" "$STAGING/lib/systemd/system/gpud.service"
install -D -m 0644 "$ROOT/contrib/systemd/gpud.sysusers" "$STAGING/usr/lib/sysusers.d/gpud.conf"
install -D -m 0644 "$ROOT/packaging/gpud.toml" "$STAGING/etc/gpud/gpud.toml"
install -d "$STAGING/usr/share/doc/gpud"
install -m 0644 "$ROOT/README.md" "$STAGING/usr/share/doc/gpud/"
for doc in install systemd troubleshooting usage; do
    if [ -f "$ROOT/docs/$doc.md" ]; then install -m 0644 "$ROOT/docs/$doc.md" "$STAGING/usr/share/doc/gpud/"; fi
done
printf 'gpud is licensed under the Apache License 2.0.\nOn Debian systems: /usr/share/common-licenses/Apache-2.0\n' \
    > "$STAGING/usr/share/doc/gpud/copyright"

# 7. Package metadata and maintainer scripts.
install -d "$STAGING/DEBIAN"
DEPENDS=
case "$PYREAL" in
    /usr/bin/python3.*) DEPENDS="Depends: python$PYVER" ;;
    *) echo "build-deb: warning: $PYREAL is not Debian's python$PYVER; the package declares no Python dependency" \
            "and needs $PYREAL on the target machine." >&2 ;;
esac
SIZE=$(du -sk --exclude=DEBIAN "$STAGING" | cut -f1)
{
    echo "Package: gpud"
    echo "Version: $VERSION"
    echo "Architecture: $ARCH"
    echo "Maintainer: $MAINTAINER"
    echo "Installed-Size: $SIZE"
    if [ -n "$DEPENDS" ]; then echo "$DEPENDS"; fi
    echo "Recommends: systemd"
    echo "Suggests: nvidia-driver"
    echo "Section: misc"
    echo "Priority: optional"
    echo "Description: run LLM model replicas on this machine's GPUs behind one endpoint"
    echo " gpud is a daemon that keeps a ledger of every GPU's memory, places model"
    echo " replicas (vLLM or any OpenAI-compatible server) on the GPUs, supervises them"
    echo " like systemd and serves all replicas of a model as one OpenAI-compatible"
    echo " endpoint. This package installs gpud in its own virtualenv under /opt/gpud and"
    echo " a systemd unit (not enabled: see /usr/share/doc/gpud/systemd.md)."
} > "$STAGING/DEBIAN/control"
echo /etc/gpud/gpud.toml > "$STAGING/DEBIAN/conffiles"

cat > "$STAGING/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# Create the gpud user, tell systemd about the unit, restart a running gpud after an upgrade.
set -e
if [ "$1" = configure ]; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers /usr/lib/sysusers.d/gpud.conf
    elif ! getent passwd gpud >/dev/null; then
        # No systemd-sysusers (e.g. a container without systemd): the same user with shadow's tools.
        if command -v useradd >/dev/null 2>&1; then
            getent group gpud >/dev/null || groupadd --system gpud
            useradd --system --gid gpud --home-dir /var/lib/gpud --no-create-home \
                --shell /usr/sbin/nologin --comment "gpud daemon" gpud
            if getent group video >/dev/null; then usermod -a -G video gpud; fi
        else
            echo "gpud: neither systemd-sysusers nor useradd found; create the system user gpud yourself." >&2
        fi
    fi
    # /run/systemd/system exists only when systemd runs (not in most containers).
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # An upgrade replaced the files under /opt/gpud: a running daemon would mix old code in memory
        # with new code on disk (each replica's launch shim starts from disk), so restart it.
        if [ -n "$2" ]; then
            systemctl try-restart gpud.service || true
        fi
    fi
    if [ -z "$2" ]; then
        echo "gpud installed. Review /etc/gpud/gpud.toml, then: systemctl enable --now gpud"
    fi
fi
exit 0
EOF
cat > "$STAGING/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# On removal (not on upgrade), stop the daemon (it stops every replica) and drop the enablement links.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop gpud.service || true
    systemctl disable gpud.service >/dev/null 2>&1 || true
fi
exit 0
EOF
cat > "$STAGING/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# On purge, remove what gpud wrote: state (saved models, replica logs, virtualenvs), caches and logs.
# The gpud user stays, as Debian does for system users (files elsewhere may still belong to it).
set -e
if [ "$1" = purge ]; then
    rm -rf /var/lib/gpud /var/cache/gpud /var/log/gpud
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
exit 0
EOF
chmod 0755 "$STAGING/DEBIAN/postinst" "$STAGING/DEBIAN/prerm" "$STAGING/DEBIAN/postrm"

DEB=$OUTDIR/gpud_${VERSION}_${ARCH}.deb
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-gzip}" --build "$STAGING" "$DEB" >/dev/null
echo "$DEB"
