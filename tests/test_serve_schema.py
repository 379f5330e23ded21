"""schemathesis against a real `jaxdp serve`: every generated request (valid and invalid) must
get an answer that matches the OpenAPI document (status codes, problem details, headers,
schemas), with every check on and zero failures. Configuration: schemathesis.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from test_serve import tickets
from test_serve_process import serve, tenant, upload

FUZZ_SECONDS = 120


@pytest.mark.slow
def test_the_api_keeps_its_openapi_contract_under_fuzzing(tmp_path):
    pytest.importorskip("schemathesis")
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert cli, "schemathesis is in the test extra"
    key = tenant(tmp_path)
    flags = ["--workers", "0", "--plan-deadline", "5", "--max-datasets-per-tenant", "50"]
    with serve(tmp_path, *flags) as (proc, url, log_path):
        upload(url, key, tickets(40))  # a real dataset for the stateful phase to find
        run = subprocess.run(
            [cli, "run", f"{url}/openapi.json", "--workers", "1"]  # every check: the default
            + ["-H", f"Authorization: Bearer {key}", "--max-time", str(FUZZ_SECONDS)]
            + ["--request-timeout", "30", "--seed", "1"],
            cwd=REPO,  # schemathesis.toml
            capture_output=True,
            text=True,
            timeout=FUZZ_SECONDS + 240,
        )
        assert proc.poll() is None, log_path.read_text()  # the server is still up
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "0 failures" in out or "failed" not in out.split("SUMMARY")[-1], out[-3000:]
