"""The `llm-dist` command: argument parsing only; each verb calls one function."""

import argparse
import os
import signal
import sys

from llm_dist import __version__

EXIT_USER_ERROR = 2  # bad spec, missing file, bad arguments (argparse uses 2 as well)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-dist",
        description="One YAML job spec from a text corpus to a served language model on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"llm-dist {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def spec_verb(name: str, help: str, parent=verbs) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=help, description=help)
        p.add_argument(
            "spec", metavar="SPEC", help="the job spec (YAML; - reads it from standard input)"
        )
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a spec field, e.g. pretrain.zero_stage=3")  # fmt: skip
        if name not in ("validate", "submit"):
            p.add_argument("--wait", action="store_true",
                           help="when another process is running in this run folder, wait for it "
                                "to end (by default this one stops at once, naming it)")  # fmt: skip
            p.add_argument("--verbose", action="store_true",
                           help="show everything Ray, Tune, torch and the workers print (by default "
                                "it goes to the run's log file, in its logs folder) and every metrics row")  # fmt: skip
        return p

    spec_verb("validate", "check a job spec and report every problem in it").add_argument(
        "--print", action="store_true", help="print the effective spec (defaults and overrides)"
    )
    spec_verb("run", "run every stage the spec names (data, pretrain, tune, serve)")
    data = verbs.add_parser("data", help="the data stage").add_subparsers(
        dest="data_verb", required=True, metavar="ACTION"
    )
    spec_verb("prepare", "read, clean, tokenize, pack and shard the corpus", parent=data)
    stdlib = data.add_parser(
        "stdlib",
        help="collect the Python standard library's sources into JSONL (the quickstart corpus)",
    )
    stdlib.add_argument(
        "out",
        metavar="OUT_DIR",
        help="writes stdlib.jsonl, stdlib_docstrings.jsonl and stdlib_packages.jsonl here",
    )
    spec_verb("pretrain", "pretrain the model with DeepSpeed ZeRO under Ray Train")
    spec_verb("tune", "run the Ray Tune fine-tuning sweep and pick the winner").add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep"
    )
    spec_verb(
        "serve", "serve the winner behind an OpenAI-compatible API with Ray Serve (until Ctrl-C)"
    )
    spec_verb("submit", "submit the spec to a Ray cluster through the Ray Jobs API").add_argument(
        "--address", required=True, help="the cluster's dashboard address, e.g. http://HEAD:8265"
    )
    report = verbs.add_parser("report", help="write a run's HTML report (plots, lineage, results)",
                              description="write the run's HTML report into its folder: one "
                                          "self-contained file, viewable offline")  # fmt: skip
    report.add_argument("run", metavar="RUN", help="the run folder, e.g. runs/quickstart")
    for name, help in (("status", "show a submitted job's status"),
                       ("logs", "print a submitted job's logs"),
                       ("stop", "stop a submitted job")):  # fmt: skip
        p = verbs.add_parser(name, help=help, description=help)
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument("--address", required=True, help="the cluster's dashboard address")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing new lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from llm_dist.base import UserError

    try:
        return _dispatch(args)
    except UserError as e:
        print(f"llm-dist: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        from llm_dist.cluster import SIGTERM_RECEIVED

        if SIGTERM_RECEIVED.is_set():
            print("llm-dist: stopped by SIGTERM", file=sys.stderr)
            return 128 + signal.SIGTERM
        print("llm-dist: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        _shutdown_ray()


def _shutdown_ray() -> None:
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # an embedded Ray's processes end with this one


def _dispatch(args: argparse.Namespace) -> int:
    from llm_dist.base import UserError

    if args.verb in ("status", "logs", "stop"):
        from llm_dist import jobs

        if args.verb == "status":
            info = jobs.status(args.job_id, args.address)
            print(
                f"{args.job_id}: {info['status']}"
                + (f" ({info['message']})" if info["message"] else "")
            )
        elif args.verb == "logs":
            jobs.logs(args.job_id, args.address, args.follow)
        elif jobs.stop(args.job_id, args.address):
            print(f"{args.job_id}: stop requested")
        else:
            print(f"{args.job_id}: already ended")
        return 0
    if args.verb == "report":
        from llm_dist.report import write_report
        from llm_dist.run_folder import RunFolder

        run = args.run if "://" in args.run else os.path.abspath(args.run)
        manifest = RunFolder(run).manifest
        if "://" not in run and not os.path.isfile(manifest):
            name = os.path.basename(manifest)
            raise UserError(f"RUN: {args.run} is not a run folder (it has no {name})")
        print(f"report: {write_report(run)}")
        return 0
    if args.verb == "data" and args.data_verb == "stdlib":
        from llm_dist.data.stdlib import collect

        counts = collect(args.out)
        print(f"{args.out}: {counts['documents']:,} documents in stdlib.jsonl, "
              f"{counts['docstring_pairs']:,} chats in stdlib_docstrings.jsonl, "
              f"{counts['labelled_functions']:,} labelled functions in stdlib_packages.jsonl")  # fmt: skip
        return 0
    from llm_dist.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    if args.verb == "validate":
        return _validate(spec, args)
    if args.verb == "submit":
        from llm_dist.jobs import submit

        job_id = submit(spec, args.address)
        print(f"submitted {job_id}; follow it with `llm-dist logs {job_id} --address "
              f"{args.address} --follow`")  # fmt: skip
        return 0
    from llm_dist import pipeline
    from llm_dist.console import capture, console
    from llm_dist.lock import hold
    from llm_dist.run_folder import run_uri

    stages = {"run": None, "data": ["data"]}.get(args.verb, [args.verb])
    # held before the log opens: a process turned away writes nothing into the folder
    with hold(run_uri(spec), args.wait), capture(run_uri(spec), args.verbose) as log:
        if log:
            console.print(f"{spec.name}: Ray's, Tune's and the workers' output goes to {log} "
                          "(--verbose shows it here)")  # fmt: skip
        try:
            folder = pipeline.run(spec, stages, resume=getattr(args, "resume", False),
                                  keep_serving=args.verb == "serve")  # fmt: skip
        finally:
            if args.verb == "run":  # a failed run's report shows how far it got
                from llm_dist.report import write_report

                try:
                    console.print(f"report: {write_report(run_uri(spec))}")
                except FileNotFoundError:
                    pass  # the run never started: nothing to report
                except Exception as e:  # the run's own outcome stands
                    console.print(f"[yellow]report: not written ({type(e).__name__}: {e})[/]")
            _shutdown_ray()  # inside the capture: Ray's goodbyes go to the log too
    console.print(f"run folder: {folder}")
    return 0


def _validate(spec, args: argparse.Namespace) -> int:
    if args.print:
        import yaml

        from llm_dist.redact import public

        print(yaml.safe_dump(public(spec), sort_keys=False), end="")
    else:
        print(f"{args.spec}: valid (run {spec.name!r}, stages: {', '.join(spec.stages)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
