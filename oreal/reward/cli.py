"""`oreal-judge`: judge a JSONL file of responses against reference answers.

    oreal-judge --input responses.jsonl --output judged.jsonl \\
        [--response-field response] [--gold-field gold] [--question-field question] \\
        [--on-malformed skip|fail] [--workers N] [--timeout 2] [--stop-word TEXT] \\
        [--verifier-host URL ...] [--verifier-model NAME]

Each output row is the input row plus `"judge": {"correct", "pred", "reason"}`, in input order. A
malformed line (not JSON, not an object, a missing or non-text field) is reported as `file:line: why`
and skipped, or ends the run with exit code 2 under `--on-malformed fail`. The output is written to a
temporary file and renamed into place when the run finishes, so a failed run never leaves a half
file behind. A summary (accuracy, timeouts, verifier calls) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

EXIT_OK, EXIT_IO, EXIT_BAD_INPUT = 0, 1, 2


class MalformedInput(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oreal-judge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file of responses ('-' for stdin)")
    p.add_argument("--output", required=True, help="JSONL file to write ('-' for stdout)")
    p.add_argument("--response-field", default="response", help="field holding the model response")
    p.add_argument("--gold-field", default="gold", help="field holding the reference answer")
    p.add_argument("--question-field", default=None, help="field holding the question (for the verifier)")
    p.add_argument("--output-field", default="judge", help="field the verdict is written to")
    p.add_argument("--on-malformed", choices=("skip", "fail"), default="skip",
                   help="skip malformed lines (reported) or stop with exit code 2")
    p.add_argument("--timeout", type=float, default=2.0, help="hard limit per item, seconds")
    p.add_argument("--workers", type=int, default=None, help="judge worker processes (default: CPU count)")
    p.add_argument("--stop-word", default=None, help="a response not ending with this is unfinished")
    p.add_argument("--thinking-finish-word", action="append", default=None, dest="thinking_words",
                   help="only text after the last of these is read (repeatable; default </think>, "
                        "<conclude>, **Final Answer**)")
    p.add_argument("--chunk-size", type=int, default=2048, help="rows judged per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    v = p.add_argument_group("LLM verifier (optional, consulted where the rules say 'not equal')")
    v.add_argument("--verifier-host", action="append", default=None,
                   help="OpenAI-compatible server base URL (repeatable: round-robin)")
    v.add_argument("--verifier-model", default=None, help="served model name")
    v.add_argument("--verifier-api-key", default=os.environ.get("OREAL_VERIFIER_API_KEY"),
                   help="bearer token (default: $OREAL_VERIFIER_API_KEY)")
    v.add_argument("--verifier-timeout", type=float, default=30.0)
    v.add_argument("--verifier-retries", type=int, default=2)
    v.add_argument("--verifier-concurrency", type=int, default=8)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0 or args.chunk_size < 1 or (args.workers is not None and args.workers < 1):
        print("oreal-judge: --timeout must be > 0, --chunk-size and --workers >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.verifier_host and not args.verifier_model:
        print("oreal-judge: --verifier-host needs --verifier-model (the served model name)", file=sys.stderr)
        return EXIT_BAD_INPUT

    from oreal.reward.extract import DEFAULT_THINKING_FINISH_WORDS
    from oreal.reward.judge import judge_batch, summarize
    from oreal.reward.verifier import LLMVerifier
    from oreal.reward.worker_pool import JudgePool, WorkerStartError

    verifier = None
    if args.verifier_host:
        verifier = LLMVerifier(args.verifier_host, args.verifier_model, api_key=args.verifier_api_key,
                               timeout=args.verifier_timeout, retries=args.verifier_retries,
                               max_concurrency=args.verifier_concurrency)
    thinking = tuple(args.thinking_words) if args.thinking_words else DEFAULT_THINKING_FINISH_WORDS

    try:
        source = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8", errors="replace")
    except OSError as e:
        print(f"oreal-judge: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return EXIT_IO
    total = _count_lines(args.input) if args.input != "-" else None
    try:
        sink, tmp_path = _open_output(args.output)
    except OSError as e:
        print(f"oreal-judge: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        source.close()
        return EXIT_IO

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="line", desc="judging", file=sys.stderr, dynamic_ncols=True)
    all_judgements = []
    malformed = 0
    ok = False
    pool = JudgePool(num_workers=args.workers)
    try:
        chunk: list[dict] = []
        for lineno, line in enumerate(source, start=1):
            if not line.strip():
                if bar is not None:
                    bar.update(1)
                continue
            try:
                row = _parse_row(line, args)
            except MalformedInput as e:
                malformed += 1
                print(f"{args.input}:{lineno}: {e}", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
                if args.on_malformed == "fail":
                    print("oreal-judge: stopping (--on-malformed fail); no output written", file=sys.stderr)
                    return EXIT_BAD_INPUT
                continue
            chunk.append(row)
            if len(chunk) >= args.chunk_size:
                all_judgements += _judge_chunk(chunk, args, thinking, pool, verifier, sink, bar, judge_batch)
                chunk = []
        if chunk:
            all_judgements += _judge_chunk(chunk, args, thinking, pool, verifier, sink, bar, judge_batch)
        ok = True
    except WorkerStartError as e:
        print(f"oreal-judge: {e}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print("oreal-judge: interrupted; no output written", file=sys.stderr)
        return 130
    finally:
        pool.close()
        if bar is not None:
            bar.close()
        if source is not sys.stdin:
            source.close()
        _close_output(sink, tmp_path, args.output, keep=ok)

    summary = summarize(all_judgements, verifier)
    summary["malformed_lines"] = malformed
    _print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


def _parse_row(line: str, args) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise MalformedInput(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise MalformedInput(f"expected a JSON object, got {type(row).__name__}")
    for field in (args.response_field, args.gold_field):
        if field not in row:
            raise MalformedInput(f"missing field {field!r}")
    response = row[args.response_field]
    if response is not None and not isinstance(response, str):
        raise MalformedInput(f"field {args.response_field!r} must be text or null, got {type(response).__name__}")
    gold = row[args.gold_field]
    if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
        raise MalformedInput(f"field {args.gold_field!r} must be text or a number, got {type(gold).__name__}")
    question = row.get(args.question_field) if args.question_field else None
    if question is not None and not isinstance(question, str):
        raise MalformedInput(f"field {args.question_field!r} must be text")
    return row


def _judge_chunk(rows, args, thinking, pool, verifier, sink, bar, judge_batch):
    questions = [r.get(args.question_field) for r in rows] if args.question_field else None
    judgements = judge_batch([r[args.response_field] for r in rows], [r[args.gold_field] for r in rows],
                             questions=questions, stop_word=args.stop_word, thinking_finish_words=thinking,
                             timeout=args.timeout, pool=pool, verifier=verifier,
                             progress=(bar.update if bar is not None else None))
    for row, j in zip(rows, judgements):
        row[args.output_field] = {"correct": j.correct, "pred": j.pred, "reason": j.reason}
        sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    sink.flush()
    return judgements


def _count_lines(path: str):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _open_output(path: str):
    if path == "-":
        return sys.stdout, None
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    return os.fdopen(fd, "w", encoding="utf-8"), tmp


def _close_output(sink, tmp_path, path, keep: bool) -> None:
    if tmp_path is None:
        sink.flush()
        return
    sink.close()
    if keep:
        os.replace(tmp_path, path)
    else:
        try:
            os.unlink(tmp_path)
        except OSError:
            pass


def _print_summary(s: dict) -> None:
    err = sys.stderr
    print(f"oreal-judge: {s['n']} rows judged" + (f", {s['malformed_lines']} malformed lines skipped"
                                                  if s["malformed_lines"] else ""), file=err)
    print(f"  accuracy   {100 * s['accuracy']:.2f}% ({s['correct']}/{s['n']})", file=err)
    print(f"  timeouts   {s['timeouts']}", file=err)
    print(f"  no answer  {s['reasons'].get('no_answer', 0) + s['reasons'].get('unfinished', 0)}", file=err)
    v = s.get("verifier")
    if v is not None:
        print(f"  verifier   calls {v['items']}, overruled to correct {s['reasons'].get('verifier', 0)}, "
              f"no verdict {v['failed']} (requests {v['requests']}, retries {v['retries']})", file=err)
    else:
        print("  verifier   not used", file=err)
    print("  reasons    " + " ".join(f"{k}={n}" for k, n in s["reasons"].items()), file=err)


if __name__ == "__main__":
    sys.exit(main())
