"""A new user's first run: `huitou up` on an empty data folder prints the console's URL and
a key of the demo shop it made, and that key signs in (a second start prints the same)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers import free_port

LINE = re.compile(r"Console: (http://\S+/console/)  sign in with .*: (hk_\S+)")


def first_line(tmp_path: Path, port: int) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HUITOU_")}
    env["HUITOU_DATA_DIR"] = str(tmp_path / "data")
    huitou = Path(sys.executable).parent / "huitou"
    process = subprocess.Popen(
        [str(huitou), "up", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            found = LINE.search(line)
            if found:
                url, key = found[1], found[2]
                with httpx.Client(base_url=url.removesuffix("/console/")) as client:
                    form = client.get("/console/sign-in")
                    pre = re.search(r'name="pre" value="([^"]+)"', form.text)
                    assert pre is not None
                    r = client.post("/console/sign-in", data={"key": key, "pre": pre[1]})
                    assert r.status_code == 303, r.text
                    page = client.get("/console/overview")
                    assert page.status_code == 200 and ">demo<" in page.text
                return url, key
            if not line and process.poll() is not None:
                break
        raise AssertionError("huitou up printed no console line")
    finally:
        process.terminate()
        process.wait(30)


def test_the_first_run_prints_where_to_sign_in_and_with_what(tmp_path: Path) -> None:
    port = free_port()
    url, key = first_line(tmp_path, port)
    assert url == f"http://127.0.0.1:{port}/console/"
    assert (tmp_path / "data" / "demo_shop_key").read_text().strip() == key
    assert first_line(tmp_path, port) == (url, key)
