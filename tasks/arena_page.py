"""The arena's vote page: a prompt and two anonymous answers side by side; A better / B better /
tie / both bad; the models revealed after the vote; each vote appended to the artifact store.

    arena_serve("./smolflow-runs", "127.0.0.1", 7860)      # `smolflow arena serve`

A small Starlette app (Starlette and uvicorn come with Prefect) rather than Gradio: Gradio 6
requires pillow<13 and this project pins pillow 13, so it cannot be installed next to the rest.
The page is plain HTML forms with no script and no external asset, so it works offline and never
fetches anything. The page reads the answers and models the arena flow wrote (arena/models.json,
arena/answers/), so it serves whatever the last arena run gathered.
"""

from __future__ import annotations

import html
import random
import secrets
import socket
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from starlette.routing import Route

from tasks.arena import BASE_RATING, win_probability
from tasks.arena_store import append_vote, arena_store, current_board, read_answers, read_models
from tasks.config_args import UserError

CHOICES = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
# Battles shown but not voted on yet: a page served for months would otherwise keep every one it
# ever showed. Beyond the cap the oldest is forgotten (its vote then reads as expired, nothing counted).
MAX_PENDING = 10_000
EXPIRED = "<p id='expired' class='reveal'>That battle had expired (or was already voted on): your vote was not counted.</p>"
MAX_FORM_BYTES = 4096  # the vote form is a battle id and a choice: a few dozen bytes
PAGE_ROUNDS = 100  # bootstrap rounds for the page's leaderboard: recomputed on every view
STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#222}
.prompt{background:#f3f3f7;padding:.8em 1em;border-radius:6px;white-space:pre-wrap}
.pair{display:flex;gap:1em;margin:1em 0}.answer{flex:1;border:1px solid #ccc;border-radius:6px;padding:.8em}
.answer pre{white-space:pre-wrap;font-family:inherit;margin:0}.votes button{font-size:1em;margin:.2em;padding:.5em 1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
.reveal{background:#eef7ee;padding:.8em 1em;border-radius:6px}"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                        f"<style>{STYLE}</style></head><body>{body}</body></html>")


def _leaderboard_html(board: dict[str, Any] | None) -> str:
    if board is None:
        return "<p>No arena yet: run the arena flow first.</p>"
    rows = "".join(f"<tr><td>{r['rank']}</td><td>{html.escape(r['name'])}</td><td>{r['rating']:.0f}</td>"
                   f"<td>{r['lower']:.0f} to {r['upper']:.0f}</td><td>{r['battles']}</td></tr>" for r in board["rows"])
    return (f"<h2>Leaderboard</h2><p id='counts'>{board['judge_battles']} judge battles, "
            f"<span id='human-votes'>{board['human_votes']}</span> human votes; anchor {html.escape(board['anchor'])} "
            f"= 1000.</p><p id='verdict'>{html.escape(board['verdict'])}</p><table id='leaderboard'><tr><th>rank</th>"
            f"<th>model</th><th>rating</th><th>95% interval</th><th>battles</th></tr>{rows}</table>")


def _remember(pending: dict[str, dict[str, Any]], battle_id: str, battle: dict[str, Any], cap: int) -> None:
    """Keep `battle` for its vote, forgetting the oldest beyond `cap` (dicts keep insertion order)."""
    pending[battle_id] = battle
    while len(pending) > cap:
        del pending[next(iter(pending))]


async def _body(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it passes `limit` bytes: the rest is never read, so a
    visitor cannot make the server hold gigabytes (uvicorn itself sets no limit)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return body


def _form(body: bytes) -> dict[str, str] | None:
    """The urlencoded form (Starlette's request.form() needs python-multipart); None if not UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return {k: v[0] for k, v in parse_qs(text).items()}


def make_app(root: str, seed: int | None = None, max_pending: int = MAX_PENDING) -> Starlette:
    """The vote page over the arena under `root` (local path, file:// or s3://)."""
    store = arena_store(root)
    rng = random.Random(seed)
    pending: dict[str, dict[str, Any]] = {}  # battle id -> who is behind A and B (never sent to the page)

    def new_battle() -> dict[str, Any] | None:
        meta = read_models(store)
        if meta is None:
            return None
        board = current_board(store, rounds=PAGE_ROUNDS)
        rating = {r["model"]: r["rating"] for r in board["rows"]}
        keys = [m["key"] for m in meta["models"]]
        pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]]
        # Informative pairs more often: weight p(1-p), highest for equally rated models.
        weights = [win_probability(rating.get(a, BASE_RATING), rating.get(b, BASE_RATING)) for a, b in pairs]
        a, b = rng.choices(pairs, weights=[p * (1 - p) + 1e-3 for p in weights])[0]
        if rng.random() < 0.5:  # either model may be on the left
            a, b = b, a
        prompt = rng.choice(meta["prompts"])
        names = {m["key"]: m["name"] for m in meta["models"]}
        battle = {"prompt": prompt, "model_a": a, "model_b": b, "name_a": names[a], "name_b": names[b],
                  "answer_a": read_answers(store, a).get(prompt, ""),
                  "answer_b": read_answers(store, b).get(prompt, "")}
        battle_id = secrets.token_urlsafe(12)
        _remember(pending, battle_id, battle, max_pending)
        return battle | {"id": battle_id}

    async def index(request: Request) -> HTMLResponse:
        notice = EXPIRED if request.query_params.get("expired") else ""  # else the vote vanishes silently
        battle = new_battle()
        if battle is None:
            return _page("smolflow arena", "<h1>smolflow arena</h1>" + _leaderboard_html(None))
        buttons = "".join(f"<button type='submit' name='choice' value='{c}'>{label}</button>"
                          for c, label in CHOICES.items())
        body = (f"<h1>smolflow arena</h1>{notice}<p>Which answer is better? The models stay hidden until you vote.</p>"
                f"<div class='prompt' id='prompt'>{html.escape(battle['prompt'])}</div><div class='pair'>"
                f"<div class='answer' id='answer-a'><h3>Model A</h3><pre>{html.escape(battle['answer_a'])}</pre></div>"
                f"<div class='answer' id='answer-b'><h3>Model B</h3><pre>{html.escape(battle['answer_b'])}</pre></div>"
                f"</div><form method='post' action='vote' class='votes'><input type='hidden' name='battle' "
                f"value='{battle['id']}'>{buttons}</form>")
        return _page("smolflow arena", body + _leaderboard_html(current_board(store, rounds=PAGE_ROUNDS)))

    async def vote(request: Request) -> HTMLResponse | PlainTextResponse | RedirectResponse:
        body = await _body(request, MAX_FORM_BYTES)
        if body is None:
            return PlainTextResponse(f"the form is over {MAX_FORM_BYTES} bytes: send it from the arena page",
                                     status_code=413)
        form = _form(body)
        if form is None:
            return PlainTextResponse("the form is not UTF-8: send it from the arena page", status_code=400)
        choice = form.get("choice", "")
        if choice not in CHOICES:  # checked before the battle is taken: a bad request must not use it up
            return PlainTextResponse(f"choice must be one of {', '.join(CHOICES)}", status_code=400)
        battle = pending.pop(form.get("battle", ""), None)
        if battle is None:
            # A page from before a restart, or a vote cast twice: nothing recorded, a fresh battle.
            return RedirectResponse("./?expired=1", status_code=303)
        append_vote(store, {k: battle[k] for k in ("prompt", "model_a", "model_b", "name_a", "name_b")}
                    | {"outcome": choice})
        body = (f"<h1>smolflow arena</h1><div class='reveal' id='reveal'><p>You voted: <b>{CHOICES[choice]}</b>.</p>"
                f"<p>Model A was <b id='name-a'>{html.escape(battle['name_a'])}</b>; model B was "
                f"<b id='name-b'>{html.escape(battle['name_b'])}</b>.</p></div>"
                f"<p><a id='next' href='./'>Next battle</a></p>")
        board = current_board(store, rounds=PAGE_ROUNDS)
        return _page("smolflow arena: vote recorded", body + _leaderboard_html(board))

    async def leaderboard_json(request: Request) -> JSONResponse:
        return JSONResponse(current_board(store, rounds=PAGE_ROUNDS))

    return Starlette(routes=[Route("/", index), Route("/vote", vote, methods=["POST"]),
                             Route("/leaderboard.json", leaderboard_json)])


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the URL is printed: a busy port is one line (UserError), and
    uvicorn serves this very socket, so nothing can take the port in between."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as err:
        raise UserError(f"--host {host!r}: {err.strerror or err}; give an address of this machine") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a restart may reuse it at once
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"port {port} on {host} is not free ({err.strerror}): stop what listens there, "
                        f"or pick another: --port {port + 1 if port < 65535 else 7860}") from None
    sock.listen(2048)
    return sock


def arena_serve(root: str, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the vote page until interrupted (`smolflow arena serve`)."""
    import uvicorn

    sock = bind(host, port)
    print(f"smolflow arena: http://{host}:{port}/  (votes go to {arena_store(root).url('votes')})", flush=True)
    uvicorn.Server(uvicorn.Config(make_app(root), log_level="warning")).run(sockets=[sock])

