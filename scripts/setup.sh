#!/usr/bin/env bash
# Idempotent set-up for a Debian 12 machine, run as root.
# Installs the Debian packages the lab and the tests need, then a venv (.venv) with netsvc and
# its lab and dev extras. Running it twice changes nothing the second time.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev
  mininet          # mnexec, which the PyPI mininet package drives
  iproute2 bridge-utils nftables iptables ethtool
  iputils-arping iputils-ping curl
  systemd          # systemd-analyze verify checks packaging/systemd/*.service in the tests
  knot bind9-dnsutils   # the lab DNS server (RFC 2136 + TSIG) and dig
  arpwatch         # the peer in bench/acd_monitor.py
  etcd-server      # the real etcd behind the state store's etcd backend (tests, lab)
  usbip iperf3     # the Linux usbip tools (wire peer) and raw TCP beside netsvc.usbip (bench)
  openssl          # netsvc.usbip's PSK mode makes a throwaway certificate with it
  procps
  python3-libvirt  # libvirt bindings (hypervisor driver): linked into .venv below
  ipmitool         # the IPMI 2.0 peer of netsvc.bmc (lanplus) in tests and the lab
  nbdkit nbdkit-plugin-python  # the lab's storage array and netsvc.storage's local endpoint
  libnbd-bin       # nbdinfo, nbdcopy (the switch-maintenance scenario's read-back)
  python3-libnbd   # libnbd bindings (netsvc.storage's paths): linked into .venv below
  rsync            # the peer beside netsvc.replication in bench/replication.py
)

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (the lab creates network namespaces)" >&2
  exit 2
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Installing knot or etcd must not start a system-wide daemon: the lab and tests run their own.
# So mask a unit only when this run is about to install its package (it is in `missing`) and no
# unit of that name exists yet: a knot or etcd the machine already had, and may be using, is
# never touched. A mask made by an earlier run stays (the package is installed by then), so a
# second run changes nothing.
for pkg_unit in knot:knot etcd-server:etcd; do
  pkg=${pkg_unit%%:*} unit=${pkg_unit#*:}
  [[ " ${missing[*]} " == *" $pkg "* ]] || continue
  present=no
  for d in /etc/systemd/system /run/systemd/system /lib/systemd/system /usr/lib/systemd/system; do
    if [ -e "$d/$unit.service" ] || [ -L "$d/$unit.service" ]; then present=yes; fi
  done
  if [ -d /etc/systemd/system ] && [ "$present" = no ]; then
    ln -s /dev/null "/etc/systemd/system/$unit.service"
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

PY=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
# -- libvirt bindings (hypervisor driver)
# netsvc.hypervisor.libvirt_driver imports libvirt lazily. The venv has no system site packages,
# so link only Debian's libvirt modules (python3-libvirt, built for /usr/bin/python3) into it.
venv_site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for src in /usr/lib/python3/dist-packages/libvirt.py /usr/lib/python3/dist-packages/libvirt_qemu.py \
           /usr/lib/python3/dist-packages/libvirt_lxc.py /usr/lib/python3/dist-packages/libvirtaio.py \
           /usr/lib/python3/dist-packages/libvirtmod*.so; do
  [ -e "$src" ] || continue
  dst="$venv_site/$(basename "$src")"
  [ "$(readlink "$dst" 2>/dev/null)" = "$src" ] || ln -sfn "$src" "$dst"
done
# -- libnbd bindings (netsvc.storage)
# The same for Debian's python3-libnbd: the package nbd/ (nbd.py) and its C module libnbdmod.
for src in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/nbd \
           /usr/lib/python3/dist-packages/libnbdmod*.so; do
  [ -e "$src" ] || continue
  dst="$venv_site/$(basename "$src")"
  [ "$(readlink "$dst" 2>/dev/null)" = "$src" ] || ln -sfn "$src" "$dst"
done
stamp=.venv/.netsvc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing netsvc into .venv"
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[lab,dev]'
  touch "$stamp"
fi
echo "setup: ready (.venv/bin/netsvc)"
