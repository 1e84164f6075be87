#!/usr/bin/env bash
# Installs espeak-ng (the speech demos' synthesiser) when it is missing: as root with apt-get;
# otherwise says how and exits non-zero. Prints espeak-ng's version when it is there.
set -euo pipefail
if ! command -v "${MOLORA_ESPEAK:-espeak-ng}" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "speech-deps.sh: installing espeak-ng" >&2
    (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null 2>&1 \
      || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng)) >&2
  else
    echo "speech-deps.sh: espeak-ng is missing: \`sudo apt-get install espeak-ng\` (Debian/Ubuntu)," \
         "\`dnf install espeak-ng\` (Fedora), \`brew install espeak-ng\` (macOS)" >&2
    exit 1
  fi
fi
"${MOLORA_ESPEAK:-espeak-ng}" --version
