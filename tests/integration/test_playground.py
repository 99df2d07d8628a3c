"""The playground over plain HTTP: GET / redirects to it, the page and its assets are served
with the right content types and reference nothing outside the app, they stay public behind
an API key while the API does not, the wheel ships them, and POST /few-shot/render returns
exactly the prompt POST /few-shot builds. (The page itself runs in tests/browser/.)"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import httpx
import pytest

from app.api.routes.playground import STATIC_DIR
from tests.integration.conftest import API_KEY, LiveServer

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
FILES = sorted(STATIC_DIR.iterdir())
# Every reference the page makes: HTML src/href, JS imports, CSS url().
REFERENCE = re.compile(
    r"""(?:src|href)="([^"]+)"|from\s+"([^"]+)"|import\s+"([^"]+)"|url\(["']?([^"')]+)"""
)
FEW_SHOT = {
    "task": "다음 문장의 감정을 긍정 또는 부정으로 분류하세요.",
    "examples": [
        {"input": "이 영화 정말 재미있었어요.", "output": "긍정"},
        {"input": "서비스가 너무 불친절했다.", "output": "부정"},
    ],
    "query": "음식이 맛있고 분위기도 좋았다.",
}


def test_root_redirects_to_the_playground(client: httpx.Client) -> None:
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/playground"
    page = client.get("/", follow_redirects=True)
    assert page.status_code == 200 and str(page.url).endswith("/playground")
    assert client.get("/playground/", follow_redirects=True).url == page.url


def test_page_and_assets_have_their_content_types(client: httpx.Client) -> None:
    page = client.get("/playground")
    assert page.headers["content-type"] == CONTENT_TYPES[".html"]
    assert '<html lang="ko">' in page.text and '<meta charset="utf-8">' in page.text
    assert {f.suffix for f in FILES} == set(CONTENT_TYPES)
    for path in FILES:
        r = client.get(f"/playground/{path.name}")
        assert r.status_code == 200, path.name
        assert r.headers["content-type"] == CONTENT_TYPES[path.suffix], path.name
        assert r.content == path.read_bytes()


def test_every_reference_is_served_by_the_app(client: httpx.Client) -> None:
    """No CDN, no external URL: every src / href / import / url() is one of the app's files."""
    for path in FILES:
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        for match in REFERENCE.finditer(text):
            ref = next(group for group in match.groups() if group)
            if ref.startswith("data:"):
                continue
            url = ref if ref.startswith("/") else f"/playground/{ref.removeprefix('./')}"
            assert client.get(url).status_code == 200, (path.name, ref)


def test_unknown_files_are_404_and_nothing_else_is_reachable(client: httpx.Client) -> None:
    for name in ("nope.js", "..%2Fapi%2Froutes_playground.py", "%2E%2E", "index.htm"):
        r = client.get(f"/playground/{name}")
        assert r.status_code == 404, name
        assert r.json()["error_type"] == "not_found"


def test_playground_is_not_in_the_api_schema(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/playground") for p in paths)
    assert "get" not in paths["/"]
    assert "/few-shot/render" in paths


def test_page_is_public_behind_the_api_key(keyed_server: LiveServer) -> None:
    with httpx.Client(base_url=keyed_server.base_url, timeout=60) as anonymous:
        assert anonymous.get("/", follow_redirects=True).status_code == 200
        for path in FILES:
            assert anonymous.get(f"/playground/{path.name}").status_code == 200, path.name
        assert anonymous.get("/openapi.json").status_code == 200  # the form is built from it
        # ... but the API is not: POST / is the TGI route, not the page
        body = {"inputs": "대한민국은", "parameters": {"max_new_tokens": 2}}
        for method, path, payload in [
            ("POST", "/", body),
            ("POST", "/generate", body),
            ("POST", "/few-shot/render", FEW_SHOT),
            ("GET", "/info", None),
        ]:
            assert anonymous.request(method, path, json=payload).status_code == 401, path
        keyed = {"Authorization": f"Bearer {API_KEY}"}
        assert anonymous.post("/generate", json=body, headers=keyed).status_code == 200
        assert anonymous.post("/few-shot/render", json=FEW_SHOT, headers=keyed).status_code == 200


def test_render_returns_the_prompt_few_shot_builds(client: httpx.Client) -> None:
    parameters = {"max_new_tokens": 4, "stop": ["끝"]}
    rendered = client.post("/few-shot/render", json={**FEW_SHOT, "parameters": parameters})
    assert rendered.status_code == 200, rendered.text
    answered = client.post("/few-shot", json={**FEW_SHOT, "parameters": parameters}).json()
    out = rendered.json()
    assert out["prompt"] == answered["prompt"]
    assert out["prompt_tokens"] == answered["prompt_tokens"]
    assert out["stop_strings"] == ["끝", "\n\n", "입력:"]  # the request's, then the template's
    custom = {**FEW_SHOT, "template": {"input_prefix": "Q: ", "stop_at_separator": False}}
    out = client.post("/few-shot/render", json=custom).json()
    assert out["prompt"].endswith("Q: 음식이 맛있고 분위기도 좋았다.\n출력:")
    assert out["stop_strings"] == []


def test_render_rejects_what_few_shot_rejects(client: httpx.Client) -> None:
    too_long = {**FEW_SHOT, "query": "대한민국 " * 2000}
    for path in ("/few-shot/render", "/few-shot"):
        r = client.post(path, json=too_long)
        assert r.status_code == 422 and r.json()["field"] == "prompt", path
    r = client.post("/few-shot/render", json={**FEW_SHOT, "query": ""})
    assert r.status_code == 422 and "query" in r.text


def test_the_wheel_ships_the_page() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["app"]
    for path in FILES:
        relative = path.relative_to(ROOT / "app").as_posix()
        assert any(fnmatch(relative, pattern) for pattern in patterns), relative
