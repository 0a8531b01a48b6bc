"""`nginx -t` on compose/nginx/nginx.conf exactly as compose mounts it.

NGINX resolves upstream names when it loads a config, and `shim-1`/`shim-2` exist only on the
compose network. The test gives `nginx -t` a private mount namespace in which a temporary
/etc/hosts maps those names to loopback, so the unmodified file is checked (only the pid
path moves to a temp dir). Needs root for the namespace; skips cleanly without it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

COMPOSE_NGINX = Path(__file__).resolve().parents[2] / "compose" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
UNSHARE = shutil.which("unshare")


def nginx_t_with_hosts(
    config: Path, hosts: list[str], tmp: Path
) -> subprocess.CompletedProcess[str]:
    """Run `nginx -t` on `config` where each of `hosts` resolves to 127.0.0.1."""
    assert NGINX and UNSHARE
    hosts_file = tmp / "hosts"
    hosts_file.write_text("127.0.0.1 localhost " + " ".join(hosts) + "\n")
    script = f'mount --bind "{hosts_file}" /etc/hosts && exec "{NGINX}" -t -c "{config}" -p "{tmp}"'
    return subprocess.run(
        [UNSHARE, "--mount", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make test installs it)")
@pytest.mark.skipif(UNSHARE is None or os.geteuid() != 0, reason="needs root and unshare")
def test_compose_nginx_config_passes_nginx_t_with_its_upstream_names(tmp_path: Path) -> None:
    text = COMPOSE_NGINX.read_text()
    upstreams = sorted(set(re.findall(r"^\s*server\s+([a-z0-9-]+):\d+", text, re.MULTILINE)))
    assert upstreams == ["shim-1", "shim-2"]
    config = tmp_path / "nginx.conf"
    config.write_text(text.replace("/var/run/nginx.pid", str(tmp_path / "nginx.pid")))

    result = nginx_t_with_hosts(config, upstreams, tmp_path)
    if "unshare failed" in result.stderr or "mount:" in result.stderr:
        pytest.skip(f"no private mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr

    # Without the names the same check fails: the test really resolves them.
    unresolved = nginx_t_with_hosts(config, [], tmp_path)
    assert unresolved.returncode != 0 and "host not found in upstream" in unresolved.stderr
