"""`oreal-judge`: judge a JSONL file of responses against reference answers.

    oreal-judge --input responses.jsonl --output judged.jsonl [--resume] \\
        [--response-field response] [--gold-field gold] [--question-field question] \\
        [--on-malformed skip|fail] [--workers N] [--timeout 2] [--stop-word TEXT] \\
        [--verifier-host URL ...] [--verifier-model NAME]

Each output row is the input row plus `"judge": {"correct", "pred", "reason"}`, in input order. A
malformed line (not UTF-8, not JSON, not an object, a missing or non-text field) is reported as
`file:line: why` and skipped, or ends the run with exit code 2 under `--on-malformed fail`.
Judged rows go to `<output>.partial` chunk by chunk, flushed to disk, and the file is renamed to
`<output>` when the run finishes: a crash or Ctrl-C keeps every row judged so far, and `--resume`
continues after them (checking that the input still starts with the same rows). A summary
(accuracy, timeouts, verifier calls) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from oreal.durable_files import fsync_dir

EXIT_OK, EXIT_IO, EXIT_BAD_INPUT = 0, 1, 2


class MalformedInput(Exception):
    pass


class CannotResume(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oreal-judge", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL file of responses ('-' for stdin)")
    p.add_argument("--output", required=True, help="JSONL file to write ('-' for stdout)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: keep the rows in <output>.partial (or <output>) and "
                        "judge the rest")
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
    p.add_argument("--chunk-size", type=int, default=256,
                   help="rows judged per batch; each finished batch is written and flushed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the summary to this JSON file")
    v = p.add_argument_group("LLM verifier (optional, consulted where the rules say 'not equal')")
    v.add_argument("--verifier-host", action="append", default=None,
                   help="OpenAI-compatible server base URL (repeatable: round-robin)")
    v.add_argument("--verifier-model", default=None, help="served model name")
    v.add_argument("--verifier-api-key", default=os.environ.get("OREAL_VERIFIER_API_KEY"),
                   help="bearer token (default: $OREAL_VERIFIER_API_KEY)")
    v.add_argument("--verifier-timeout", type=float, default=30.0, help="total deadline per request, seconds")
    v.add_argument("--verifier-retries", type=int, default=2)
    v.add_argument("--verifier-concurrency", type=int, default=8)
    return p


def _usage_problem(args) -> str | None:
    from oreal.reward.worker_pool import check_timeout

    try:
        check_timeout(args.timeout, "--timeout")
        if args.verifier_host:
            check_timeout(args.verifier_timeout, "--verifier-timeout")
    except ValueError as e:
        return str(e)
    if args.chunk_size < 1 or (args.workers is not None and args.workers < 1):
        return "--chunk-size and --workers must be >= 1"
    if args.verifier_retries < 0 or args.verifier_concurrency < 1:
        return "--verifier-retries must be >= 0 and --verifier-concurrency >= 1"
    if args.verifier_host and not args.verifier_model:
        return "--verifier-host needs --verifier-model (the served model name)"
    if args.resume and args.output == "-":
        return "--resume needs an output file (not '-')"
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    problem = _usage_problem(args)
    if problem:
        print(f"oreal-judge: {problem}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from oreal.reward.extract import DEFAULT_THINKING_FINISH_WORDS
    from oreal.reward.judging import judge_batch, summarize
    from oreal.reward.verifier import LLMVerifier
    from oreal.reward.worker_pool import JudgePool, WorkerStartError

    verifier = None
    if args.verifier_host:
        verifier = LLMVerifier(args.verifier_host, args.verifier_model, api_key=args.verifier_api_key,
                               timeout=args.verifier_timeout, retries=args.verifier_retries,
                               max_concurrency=args.verifier_concurrency)
    thinking = tuple(args.thinking_words) if args.thinking_words else DEFAULT_THINKING_FINISH_WORDS

    try:
        source = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    except OSError as e:
        print(f"oreal-judge: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return EXIT_IO
    try:
        out = _Output(args.output, args.output_field, args.resume)
    except CannotResume as e:
        print(f"oreal-judge: {e}", file=sys.stderr)
        _close_source(source)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"oreal-judge: cannot write {args.output}: {e.strerror}", file=sys.stderr)
        _close_source(source)
        return EXIT_IO

    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        total = _count_lines(args.input) if args.input != "-" else None
        bar = tqdm(total=total, unit="line", desc="judging", file=sys.stderr, dynamic_ncols=True)
    malformed = 0
    finished = False
    pool = JudgePool(num_workers=args.workers)
    try:
        chunk: list[dict] = []
        valid_rows = 0
        for lineno, raw in enumerate(source, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line, undecodable = None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"
            if line is not None and not line.strip():
                _advance(bar, 1)
                continue
            try:
                if line is None:
                    raise MalformedInput(undecodable)
                row = _parse_row(line, args)
            except MalformedInput as e:
                malformed += 1
                print(f"{args.input}:{lineno}: {e}", file=sys.stderr)
                _advance(bar, 1)
                if args.on_malformed == "fail":
                    print(f"oreal-judge: stopping (--on-malformed fail); {out.kept_message()}", file=sys.stderr)
                    return EXIT_BAD_INPUT
                continue
            valid_rows += 1
            if valid_rows <= out.resumed_rows:  # judged by the interrupted run
                out.check_same_row(valid_rows, row, f"{args.input}:{lineno}")
                _advance(bar, 1)
                continue
            chunk.append(row)
            if len(chunk) >= args.chunk_size:
                _judge_chunk(chunk, args, thinking, pool, verifier, out, bar, judge_batch)
                chunk = []
        if chunk:
            _judge_chunk(chunk, args, thinking, pool, verifier, out, bar, judge_batch)
        if valid_rows < out.resumed_rows:
            raise CannotResume(f"{out.partial} holds {out.resumed_rows} judged rows but {args.input} has only "
                               f"{valid_rows}: it is not the input of the interrupted run")
        out.finish()
        finished = True
    except CannotResume as e:
        print(f"oreal-judge: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except WorkerStartError as e:
        print(f"oreal-judge: {e}; {out.kept_message()}", file=sys.stderr)
        return EXIT_IO
    except KeyboardInterrupt:
        print(f"oreal-judge: interrupted; {out.kept_message()}", file=sys.stderr)
        return 130
    finally:
        pool.close()
        if bar is not None:
            bar.close()
        _close_source(source)
        if not finished:
            out.abandon()

    summary = summarize(out.judgements, verifier)
    summary["malformed_lines"] = malformed
    summary["resumed_rows"] = out.resumed_rows
    _print_summary(summary)
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return EXIT_OK


class _Output:
    """Judged rows on their way to `path`: appended to `path.partial`, flushed and fsynced after
    every chunk, renamed to `path` at the end. '-' streams to stdout instead."""

    def __init__(self, path: str, field: str, resume: bool):
        from oreal.reward.judging import Judgement

        self.path, self.field = path, field
        self.judgements: list = []
        self.previous_rows: list[dict] = []
        self.resumed_rows = 0
        self.written = 0
        if path == "-":
            self.partial, self.sink = None, sys.stdout
            return
        self.partial = path + ".partial"
        if not resume and os.path.exists(self.partial):
            raise CannotResume(f"{self.partial} holds rows judged by an interrupted run: pass --resume to "
                               "continue it, or delete it to start again")
        if resume and not os.path.exists(self.partial) and os.path.exists(path):
            os.replace(path, self.partial)  # a finished run: resuming it judges only rows added since
        if resume and os.path.exists(self.partial):
            self.previous_rows = self._read_judged_prefix()
            self.resumed_rows = len(self.previous_rows)
            for row in self.previous_rows:
                verdict = row[field]
                self.judgements.append(Judgement(verdict["correct"], verdict["pred"], verdict["reason"]))
            self.sink = open(self.partial, "a", encoding="utf-8")
        else:
            self.sink = open(self.partial, "w", encoding="utf-8")

    def _read_judged_prefix(self) -> list[dict]:
        """The complete, well-formed rows at the start of the partial file; a line torn by the crash
        (and anything after it) is cut off, to be judged again."""
        rows, good_bytes = [], 0
        with open(self.partial, "rb") as f:
            for raw in f:
                try:
                    row = json.loads(raw.decode("utf-8")) if raw.endswith(b"\n") else None
                except (UnicodeDecodeError, json.JSONDecodeError):
                    row = None
                verdict = row.get(self.field) if isinstance(row, dict) else None
                if not (isinstance(verdict, dict) and {"correct", "pred", "reason"} <= verdict.keys()):
                    break
                rows.append(row)
                good_bytes += len(raw)
        os.truncate(self.partial, good_bytes)
        return rows

    def check_same_row(self, number: int, row: dict, where: str) -> None:
        judged = dict(self.previous_rows[number - 1])
        judged.pop(self.field, None)
        if judged != row:
            raise CannotResume(f"{where}: differs from row {number} of {self.partial}; the input changed since "
                               "the interrupted run, so its rows cannot be kept (delete the file to start again)")

    def write(self, rows: list[dict], judgements: list) -> None:
        for row, j in zip(rows, judgements):
            row[self.field] = {"correct": j.correct, "pred": j.pred, "reason": j.reason}
            self.sink.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.sink.flush()
        if self.partial is not None:
            os.fsync(self.sink.fileno())
        self.judgements += judgements
        self.written += len(rows)

    def kept_message(self) -> str:
        if self.partial is None:
            return f"{self.written} judged rows were written to stdout"
        kept = self.resumed_rows + self.written
        if kept == 0:
            return "no output written"
        return f"the {kept} rows judged so far are kept in {self.partial} (rerun with --resume to continue)"

    def finish(self) -> None:
        if self.partial is None:
            self.sink.flush()
            return
        self.sink.close()
        os.replace(self.partial, self.path)
        fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def abandon(self) -> None:
        """After a failure: keep the partial file if it holds any judged row, else remove it."""
        if self.partial is None:
            return
        self.sink.close()
        if self.resumed_rows + self.written == 0:
            try:
                os.unlink(self.partial)
            except OSError:
                pass



def _advance(bar, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _close_source(source) -> None:
    if source is not sys.stdin.buffer:
        source.close()


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


def _judge_chunk(rows, args, thinking, pool, verifier, out: _Output, bar, judge_batch) -> None:
    questions = [r.get(args.question_field) for r in rows] if args.question_field else None
    judgements = judge_batch([r[args.response_field] for r in rows], [r[args.gold_field] for r in rows],
                             questions=questions, stop_word=args.stop_word, thinking_finish_words=thinking,
                             timeout=args.timeout, pool=pool, verifier=verifier,
                             progress=(bar.update if bar is not None else None))
    out.write(rows, judgements)


def _count_lines(path: str):
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def _print_summary(s: dict) -> None:
    err = sys.stderr
    print(f"oreal-judge: {s['n']} rows judged" + (f", {s['malformed_lines']} malformed lines skipped"
                                                  if s["malformed_lines"] else "")
          + (f" ({s['resumed_rows']} kept from the interrupted run)" if s.get("resumed_rows") else ""), file=err)
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
