"""Property-based fuzzing of the public API from its own OpenAPI document: no 5xx, no off-schema response."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.meshes import API_KEY

MAX_EXAMPLES = 15


def test_openapi_document_holds_under_fuzzing(mesh, tmp_path):
    st = Path(sys.executable).parent / "st"
    result = subprocess.run(
        [
            str(st),
            "run",
            f"{mesh.edge_url}/openapi.json",
            "--checks",
            "not_a_server_error,response_schema_conformance",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--header",
            f"X-API-Key: {API_KEY}",
            "--request-timeout",
            "30",
            "--generation-deterministic",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
