#!/usr/bin/env bash
# The system packages some tests need, installed once, by hand or by .ci/run (Debian/Ubuntu, as root):
#   slurmctld slurmd slurm-client munge    a real SLURM on localhost (tests/slurm/start.sh starts it)
#   texlive-latex-base texlive-latex-recommended poppler-utils    pdflatex + booktabs, pdftoppm (LaTeX reports)
# The tests never install anything: without these they skip with a one-line reason that names this script
# (and fail instead where HARNESS_TESTS_REQUIRE_SYSTEM=1, as in CI).
#
#   bash tools/install_system_packages.sh           install what is missing
#   bash tools/install_system_packages.sh --check   only say what is missing (exit 1 if anything is)
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge texlive-latex-base texlive-latex-recommended poppler-utils)

missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -eq 0 ]; then
    echo "system packages: all present (${PACKAGES[*]})"
    exit 0
fi
if [ "${1:-}" = --check ]; then
    echo "system packages missing: ${missing[*]}"
    exit 1
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system packages missing: ${missing[*]}; install them as root with apt-get (this script, run as root)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]}"
apt_install() { apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=600 "${missing[@]}"; }
apt_install || { apt-get update -qq && apt_install; }     # a stale package list: refresh it once
