"""The /dashboard page in headless Chromium: it polls /v1/stats and draws the expert utilisation chart.

Chromium is Debian's package, installed by `make test` when missing (see the Makefile); without it
this test skips and says so.
"""

import re
import shutil
import subprocess

import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed; pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="httpx is not installed; pip install -e '.[dev]'")
mpimg = pytest.importorskip("matplotlib.image", reason="matplotlib is needed to read the screenshot")

from test_serve import ADMIN, ADMIN_TOKEN, start, write_checkpoint  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
         "--no-first-run", "--virtual-time-budget=4000"]


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it when run as root)")
def test_dashboard_draws_the_utilisation_chart(tmp_path):
    engine, server = start(write_checkpoint(tmp_path / "ckpt"), admin_token=ADMIN_TOKEN)
    with server, httpx.Client(base_url=server.url, timeout=60) as client:
        for i in range(3):
            assert client.post("/v1/completions", json={"prompt": f"dash {i}", "max_tokens": 6}).status_code == 200
        assert client.post("/admin/experts/mask", json={"layer": 1, "experts": [3]}, headers=ADMIN).status_code == 200
        page = client.get("/dashboard")
        assert page.status_code == 200 and "<canvas id=\"utilization\"" in page.text
        assert "http" not in re.sub(r"<!--.*?-->", "", page.text).replace(server.url, "")  # no CDN

        dom = chromium("--dump-dom", f"{server.url}/dashboard")
        assert dom.returncode == 0, dom.stderr.decode()[-2000:]
        canvas = re.search(r'<canvas id="utilization"[^>]*>', dom.stdout.decode())
        assert canvas is not None, dom.stdout.decode()[:2000]
        assert 'data-drawn="true"' in canvas.group(0)
        # 2 layers x 4 experts, all used so far; the masked expert of layer 1 has had tokens before the mask.
        assert int(re.search(r'data-bars="(\d+)"', canvas.group(0)).group(1)) >= 6
        assert re.search(r'<b id="model">tiny</b>|<span id="model">tiny</span>', dom.stdout.decode())

        shot = tmp_path / "dashboard.png"
        result = chromium(f"--screenshot={shot}", "--window-size=1000,800", f"{server.url}/dashboard")
        assert result.returncode == 0 and shot.is_file(), result.stderr.decode()[-2000:]
    rgb = mpimg.imread(shot)[..., :3]
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Utilisation bars are blue (hsl 215); the masked expert is grey (#bbb).
    bar_pixels = int(((blue - red > 0.25) & (blue > 0.5)).sum())
    grey_pixels = int(((abs(red - 0xbb / 255) < 0.02) & (abs(green - red) < 0.02) & (abs(blue - red) < 0.02)).sum())
    assert bar_pixels > 5000, f"only {bar_pixels} bar-coloured pixels in the screenshot"
    assert grey_pixels > 500, f"only {grey_pixels} grey (masked) pixels in the screenshot"
