"""`kunserve generate`: send one prompt and stream the answer to stdout.

The coordinator's CLI dispatches `kunserve generate ARGS...` to `generate_main(ARGS)`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from client.api_types import Delta, Finished, KunserveError
from client.grpc_client import KunserveClient


def build_generate_parser() -> argparse.ArgumentParser:
    """The `kunserve generate` argument parser."""
    p = argparse.ArgumentParser(
        prog="kunserve generate", description="Stream one completion from a kunserve server."
    )
    p.add_argument("prompt", help="prompt text (with --chat: the user message)")
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="server gRPC port (default 50051)")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="send as one user chat message")
    p.add_argument("--timeout", type=float, default=None, help="RPC deadline (seconds)")
    p.add_argument("--usage", action="store_true", help="print token counts to stderr at the end")
    return p


def generate_main(argv: Sequence[str] | None = None) -> int:
    """Runs `kunserve generate`; returns the process exit code (0 ok, 1 RPC error, 130 ^C)."""
    args = build_generate_parser().parse_args(argv)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "seed": args.seed,
    }
    wrote, finished = False, None
    with KunserveClient(args.host, args.port) as client:
        stream = client.generate(prompt, timeout=args.timeout, **sampling)
        try:
            for event in stream:
                if isinstance(event, Delta) and event.text:
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                    wrote = True
                elif isinstance(event, Finished):
                    finished = event
        except KunserveError as err:
            _end_line(wrote)
            print(f"error: {err.code_name}: {err.message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            stream.cancel()
            _end_line(wrote)
            return 130
    _end_line(True)
    if args.usage and finished is not None:
        _print_usage(finished)
    return 0


def _end_line(wrote: bool) -> None:
    if wrote:
        sys.stdout.write("\n")
        sys.stdout.flush()


def _print_usage(event: Finished) -> None:
    u, t = event.usage, event.timing
    print(
        f"[{event.reason}] prompt={u.prompt_tokens} completion={u.completion_tokens} tokens, "
        f"server ttft={t.ttft_s * 1000:.1f} ms e2e={t.e2e_s * 1000:.1f} ms",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(generate_main())
