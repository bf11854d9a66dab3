"""The ``steer`` console script. Subcommands import their heavy modules lazily, so ``steer --help``
is instant and a user mistake is one line on stderr with exit code 1, never a traceback."""

from __future__ import annotations

import argparse
import logging
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 1."""


def _command(ns: argparse.Namespace) -> str:
    """The command line that produced an artifact, recorded in its provenance."""
    return " ".join(["steer", *ns.argv])


def _cmd_serve(ns: argparse.Namespace) -> int:
    from server.app import StartupError, create_app
    from server.backends import UnknownBackend
    from server.memory import bound_kernel_caches, limit_arenas
    from server.runner import serve
    from server.settings import SettingsError, settings_from_args

    limit_arenas()  # before any worker thread exists (server/memory.py)
    bound_kernel_caches()  # before the first matmul
    try:
        settings = settings_from_args(ns)
        app = create_app(settings)
    except (SettingsError, StartupError, UnknownBackend) as e:
        raise CLIError(str(e)) from None
    print(f"steer: serving {app.state.backend.model_name} on http://{settings.host}:{settings.port}", flush=True)
    return serve(app, settings.host, settings.port, shutdown_timeout=settings.shutdown_timeout)


def _cmd_demo_model(ns: argparse.Namespace) -> None:
    from steer.demo import DEMO, JUDGE, ensure_demo_model

    print(ensure_demo_model(JUDGE if ns.judge else DEMO))


def _cmd_extract(ns: argparse.Namespace) -> None:
    from steer.calibrate import ExtractConfig, check_lower, run_extract

    cfg = ExtractConfig(
        model=ns.model, out=ns.out, name=ns.name, layers=ns.layers, gate_layer=ns.gate_layer,
        limit=ns.limit, seed=ns.seed, gate_templates=ns.gate_templates, gate_fpr=ns.gate_fpr,
        gate_conversations=ns.gate_conversations,
        gate_layers=ns.gate_layers, lower=ns.lower, lower_margin=ns.lower_margin, lower_span=ns.lower_span,
        lower_floor=ns.lower_floor,
    )
    check_lower(ns.lower, ns.lower_margin, ns.lower_span, ns.lower_floor)  # before any model loads
    if ns.and_gates:
        from steer.calibrate import and_gates

        if ns.refit_gate or ns.model:
            raise CLIError("--and-gates: copies two vectors' gates, give it without --refit-gate or --model")
        print(and_gates(*ns.and_gates, name=ns.name, out=ns.out, command=_command(ns)))
        return
    if ns.refit_gate:  # its errors (VectorError, ModelError) are user errors: main() prints them as one line
        from steer.calibrate import run_refit_gate

        if ns.layers:
            raise CLIError("--layers: --refit-gate keeps the source vector's steered layers")
        print(run_refit_gate(cfg, ns.refit_gate, command=_command(ns)))
        return
    if ns.gate_fpr is not None:
        raise CLIError("--gate-fpr: only with --refit-gate (steer extract chooses its threshold on the dev split "
                       "together with the coefficient)")
    if ns.gate_layers:
        raise CLIError("--gate-layers: only with --refit-gate (steer extract chooses one gate layer on the dev split)")
    print(run_extract(cfg, command=_command(ns)))


def _cmd_eval(ns: argparse.Namespace) -> None:
    from server.evaluation import EvalError, run_from_args

    try:
        print(run_from_args(ns, command=_command(ns)))
    except EvalError as e:
        raise CLIError(str(e)) from None


def _cmd_merge(ns: argparse.Namespace) -> None:
    from steer.merge import MergeError, MergeRequest, run_merge
    from steer.vectors import VectorError

    names = ("beta", "gamma", "interference_scale", "density", "drop_p", "seed", "lambda_", "threshold", "scale", "ada",
             "rescale")
    params = {n.rstrip("_"): getattr(ns, n) for n in names if getattr(ns, n) is not None}
    req = MergeRequest(method=ns.method, out=ns.out, ft=ns.ft, base=ns.base, aligned=ns.aligned,
                       surrogate=ns.surrogate, vector=ns.vector, mask=ns.mask, params=params, force=ns.force,
                       command=_command(ns))
    try:
        print(run_merge(req))
    except (MergeError, VectorError) as e:
        raise CLIError(str(e)) from None


def _cmd_distill(ns: argparse.Namespace) -> None:
    from steer.distill.answers import AnswerError
    from steer.distill.options import config_from_args
    from steer.distill.run import DistillError, run_distill

    try:
        print(run_distill(config_from_args(ns), command=_command(ns)))
    except (DistillError, AnswerError) as e:
        raise CLIError(str(e)) from None


def _parser() -> argparse.ArgumentParser:
    from server.settings import add_cli_arguments

    ap = argparse.ArgumentParser(prog="steer", description="Safety steering server and tools.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API with safety steering")
    add_cli_arguments(serve)
    serve.set_defaults(fn=_cmd_serve)

    demo = sub.add_parser("demo-model", help="fetch, verify and convert the demo model; print its directory")
    demo.add_argument("--judge", action="store_true",
                      help="the judge model instead (Qwen2.5-Coder-1.5B-Instruct, for steer eval --judge llm)")
    demo.set_defaults(fn=_cmd_demo_model)

    ex = sub.add_parser("extract", help="compute a gated refusal-direction safety vector")
    ex.add_argument("--model", default=None, help="HF checkpoint directory (default: the demo model)")
    ex.add_argument("--out", default="vectors", help="directory to write NAME.safetensors + NAME.json")
    ex.add_argument("--name", default="refusal", help="vector name")
    ex.add_argument("--layers", default=None, help="steered layers, e.g. 12,13 (default: chosen on the dev split)")
    ex.add_argument("--gate-layer", type=int, default=None, help="gate layer (default: chosen on the dev split)")
    ex.add_argument("--limit", type=int, default=None, help="use at most N prompts per set (quick runs)")
    ex.add_argument("--seed", type=int, default=0, help="split seed")
    ex.add_argument("--refit-gate", default=None, metavar="VECTOR.json",
                    help="keep this gated activation vector's direction and coefficient, refit its gate on --model "
                         "(e.g. the fine-tune it will guard: a fine-tune moves the residual stream the gate reads)")
    ex.add_argument("--and-gates", nargs=2, default=None, metavar=("VECTOR.json", "OTHER.json"),
                    help="write a copy of VECTOR (--name, --out) whose gate opens a row only where OTHER's gate "
                         "opens it too (both gated activation vectors for the same model; OTHER's gate layers among "
                         "VECTOR's). No model runs")
    ex.add_argument("--gate-templates", action=argparse.BooleanOptionalAction, default=None,
                    help="also fit the gate on harmful and benign requests inside jailbreak templates of the fitting "
                         "template families, and choose its threshold with benign requests inside dev-family templates "
                         "(held-out families never used; see steer/templates.py). Default: off for a new vector; with "
                         "--refit-gate, as the source vector was made")
    ex.add_argument("--gate-conversations", action=argparse.BooleanOptionalAction, default=None,
                    help="also fit the gate on chat shapes (a benign request, the model's answer and a follow-up such as "
                         "'Can you give me an example?'; a harmful request, a refusal and a push; short messages such as "
                         "'ok'), and choose its threshold with dev ones (steer/_data/conversation.txt, its test third "
                         "never used). Default: off for a new vector; with --refit-gate, as the source vector was made")
    ex.add_argument("--gate-layers", default=None, metavar="L-M|L,..",
                    help="with --refit-gate: a multi-layer gate reading the residual at each of these layers (e.g. 9-13; "
                         "the last decides and must not follow the first steered layer). Default: the source's gate layers")
    ex.add_argument("--gate-fpr", type=float, default=None, metavar="F",
                    help="with --refit-gate: set the gate's threshold so that at most this fraction of the dev benign "
                         "prompts fire it (default: the source's, 0 for a vector steer extract made). Higher buys "
                         "recall on milder harmful requests")
    ex.add_argument("--lower", type=float, default=0.0, metavar="C",
                    help="two-sided gate: rows scoring below a lower threshold (--lower-margin below every harmful "
                         "prompt the gate was fitted or tuned on) get the direction subtracted at C times an open "
                         "row's strength, lowering refusal on prompts judged benign with confidence (default 0: off)")
    ex.add_argument("--lower-margin", type=float, default=0.5, metavar="M",
                    help="with --lower: the lower threshold's distance below the lowest harmful score, in probe-logit "
                         "units (default 0.5)")
    ex.add_argument("--lower-span", default="prompt", metavar="SPAN",
                    help="with --lower: where a lowered row is steered: 'prompt' (its prompt, where the answer's "
                         "first token is decided; its generated tokens run vanilla) or 'all' (every position, "
                         "generated tokens included). Default: prompt")
    ex.add_argument("--lower-floor", action="store_true",
                    help="with --lower: lower only a band: rows scoring at or below the highest score of the code "
                         "prompts the gate was fitted or tuned on stay vanilla (lowering them only degrades code)")
    ex.set_defaults(fn=_cmd_extract)

    from server.evaluation.config import add_arguments as add_eval_arguments

    ev = sub.add_parser("eval", help="safety/utility evaluation of any OpenAI-compatible endpoint")
    add_eval_arguments(ev)
    ev.set_defaults(fn=_cmd_eval)

    mg = sub.add_parser("merge", help="weight-space merge: EnchTable, RESTA, TIES, DARE, Safe LoRA, ... (steer.merge)")
    mg.add_argument("--method", required=True, help="enchtable, task_arithmetic (resta), ties, dare, dare_ties, "
                    "breadcrumbs, safe_lora, tsv, model_stock, linear, slerp, somf")
    mg.add_argument("--out", required=True, help="output checkpoint directory (must not exist, see --force)")
    mg.add_argument("--ft", required=True, help="fine-tuned checkpoint directory")
    mg.add_argument("--base", help="checkpoint before fine-tuning (task vector tau = ft - base)")
    mg.add_argument("--aligned", help="aligned checkpoint (safety vector sigma = aligned - surrogate)")
    mg.add_argument("--surrogate", help="unaligned surrogate checkpoint")
    mg.add_argument("--vector", help="steer weight vector manifest (NAME.json) used as sigma")
    mg.add_argument("--mask", help="safetensors file of per-parameter masks in [0, 1] (somf)")
    for name, typ in (("--beta", float), ("--gamma", float), ("--interference-scale", float), ("--density", float),
                      ("--drop-p", float), ("--seed", int), ("--lambda", float), ("--threshold", float),
                      ("--scale", float)):
        mg.add_argument(name, type=typ, default=None, dest=None if name != "--lambda" else "lambda_",
                        metavar=name[2:].upper().replace("-", "_"),
                        help="method parameter (defaults and ranges: steer/merge/methods.py)")
    mg.add_argument("--ada", action=argparse.BooleanOptionalAction, default=None,
                    help="global norm matching: sigma *= beta ||tau|| / ||sigma|| (enchtable: on; resta: off)")
    mg.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                    help="somf: divide the mask by its mean per tensor, as the reference does (default: on)")
    mg.add_argument("--force", action="store_true", help="replace --out if it exists")
    mg.set_defaults(fn=_cmd_merge)

    from steer.distill.options import add_arguments as add_distill_arguments

    di = sub.add_parser("distill", help="EnchTable stage 1: distill a weight safety vector from a harmful surrogate")
    add_distill_arguments(di)
    di.set_defaults(fn=_cmd_distill)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    ns.argv = argv
    try:
        code = ns.fn(ns)
    except CLIError as e:
        print(f"steer: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # known library errors are user-facing; anything else is a bug worth a trace
        from steer.errors import USER_ERRORS

        if isinstance(e, USER_ERRORS):
            print(f"steer: error: {e}", file=sys.stderr)
            return 1
        raise
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
