"""`gptlab chat SOURCE`: talk with a text model, turn by turn (the session logic: `gptlab.chat`).

In a terminal: a banner, a `>>> ` prompt, each reply streamed token by token, then one dim line
with its tokens and tokens/s. Ctrl-C stops the reply being written (the session goes on); at the
prompt, a second Ctrl-C in a row leaves, as do /quit and Ctrl-D.

With stdin not a terminal (a pipe, a file) it is scriptable: each input line is one user turn (or a
/command), each reply is one line on stdout (a newline inside a reply is written as the two
characters `\\n`; a turn that fails prints an empty line and its error on stderr), and nothing else
goes to stdout: notes, command answers and the tokens/s lines go to stderr. Empty lines are skipped.
"""

from __future__ import annotations

import sys

from gptlab import GptlabError
from gptlab.cli.args import add_verb, nonneg_float, nonneg_int, positive_int, top_p

DIM, RESET = "\033[2m", "\033[0m"
PROMPT = ">>> "


def dim(text: str, stream) -> str:
    """`text` in ANSI dim when `stream` is a terminal, as it is otherwise."""
    isatty = getattr(stream, "isatty", None)
    return f"{DIM}{text}{RESET}" if isatty is not None and isatty() else text


def add_chat(sub) -> None:
    from gptlab.chat import DEFAULTS

    s = add_verb(sub, "chat", "talk with a text model turn by turn, through its chat template "
                 "(/reset, /system, /set, /quit); reads one turn per line when stdin is not a terminal", cmd_chat)
    s.add_argument("run", help="a text model: a preset (smollm2-135m-instruct), a .gguf file, an HF directory, "
                   "or a run tuned from one")
    s.add_argument("--system", default=None, help="a system message for the chat template")
    s.add_argument("--temperature", type=nonneg_float, default=DEFAULTS["temperature"], help="0: greedy")
    s.add_argument("--top-p", type=top_p, default=DEFAULTS["top_p"], help="nucleus sampling mass (1: off)")
    s.add_argument("--top-k", type=nonneg_int, default=None, help="sample among the k likeliest tokens (0: off)")
    s.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help=f"reply length limit in tokens (default {DEFAULTS['max_new_tokens']}, or half the context "
                   "when that is smaller)")
    s.add_argument("--seed", type=int, default=None, help="for a repeatable conversation")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N, mps")


def cmd_chat(a) -> int:
    from gptlab.chat import ChatSession
    from gptlab.load import load
    from gptlab.train.trainer import resolve_device

    loaded = load(a.run, device=resolve_device(a.device))
    session = ChatSession.from_loaded(loaded, system=a.system, temperature=a.temperature, top_p=a.top_p,
                                      top_k=a.top_k or None, max_new_tokens=a.max_new_tokens, seed=a.seed)
    if not session.template:
        print(f"note: {a.run} has no chat template: the conversation goes to it as a plain transcript "
              f"(\"User: ...\" / \"Assistant:\" lines) and each reply ends where it starts a new \"User:\" line",
              file=sys.stderr)
    interactive = sys.stdin.isatty()
    return _terminal(session, a.run) if interactive else _piped(session)


def _run_command(session, line: str, out) -> bool:
    """Run a /command, its answer (or its one-line error) on `out`; True when it ends the session."""
    try:
        r = session.command(line)
    except GptlabError as e:
        print(f"gptlab: {e}", file=out, flush=True)
        return False
    if r.message:
        print(dim(r.message, out), file=out, flush=True)
    return r.quit


def _piped(session) -> int:
    for line in sys.stdin:
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        if session.is_command(line):
            if _run_command(session, line, sys.stderr):
                break
            continue
        try:
            reply = session.send(line, note=lambda n: print(n, file=sys.stderr, flush=True))
        except GptlabError as e:
            print(flush=True)
            print(f"gptlab: error: {e}", file=sys.stderr, flush=True)
            continue
        print(reply.text.replace("\r\n", "\n").replace("\n", "\\n"), flush=True)
        print(dim(reply.stats(), sys.stderr), file=sys.stderr, flush=True)
    return 0


def _terminal(session, source: str) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    out = sys.stdout
    how = "its chat template" if session.template else "a plain transcript (no chat template)"
    print(f"chatting with {source} through {how}; {session.describe_settings()}", file=out)
    print(dim("/help for commands; /quit, Ctrl-D or Ctrl-C twice to leave; Ctrl-C stops a reply", out), file=out)
    armed = False  # a Ctrl-C at the prompt was pressed: the next one leaves
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=out)
            return 0
        except KeyboardInterrupt:
            if armed:
                print(file=out)
                return 0
            armed = True
            print("\n" + dim("(Ctrl-C again, /quit or Ctrl-D to leave)", out), file=out)
            continue
        armed = False
        if not line.strip():
            continue
        if session.is_command(line):
            if _run_command(session, line, out):
                return 0
            continue
        try:
            reply = session.send(line, stream=lambda piece: (out.write(piece), out.flush()),
                                 note=lambda n: print(dim(n, out), file=out, flush=True))
        except GptlabError as e:
            print(f"gptlab: error: {e}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # between the reply and its stats: nothing to undo
            print(file=out)
            continue
        print(file=out)
        print(dim(reply.stats(), out), file=out, flush=True)
