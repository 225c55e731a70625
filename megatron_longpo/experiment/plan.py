"""--plan: what an experiment would run and what it costs; nothing started."""
from __future__ import annotations

from .spec import SEED_KEYS, Experiment, Rounds, SpecError, eval_tasks, samples_per_task, seeds_of, sweep_models


def plan_text(exp) -> str:
    if isinstance(exp, Rounds):
        lines = [f"workdir {exp.workdir}", f"round 1's generator: {exp.spec['model']}", "rounds:"]
        for r in exp.rounds:
            theta = f"{r.rope_theta:g}" if r.rope_theta is not None else f"the generator's x {exp.spec.get('rope_factor', 10):g}"
            lines.append(f"  {r.index}: {r.length} tokens, RoPE base {theta}, chunks of {r.chunk_tokens} tokens, {r.config}")
        return "\n".join(lines)
    pairs, docs = exp.spec.get("pairs") or {}, (exp.spec.get("pairs") or {}).get("documents") or {}
    made = f"generated on {docs.get('n')} documents of {docs.get('words')} words"
    lines = [f"workdir {exp.workdir}",
             "pairs: " + (f"unpacked from {pairs['compact']}" + (f", then {made} (those without a pair)" if pairs.get("grow") else "")
                          if pairs.get("compact") else made),
             f"references: {', '.join(exp.references()) or 'none'}",
             f"seeds: {', '.join(map(str, seeds_of(exp.spec)))} ({' and '.join(SEED_KEYS)})",
             ("models of the sweep (seed 0, the dev samples):" if exp.sweep else "models:")]
    for m in exp.models:
        lines.append(f"  {m.name:<16} " + (f"train {m.method} {' '.join(m.overrides)}" if m.method else
                                          "untrained" + (f" at RoPE base {m.rope_theta:g}" if m.rope_theta else ""))
                     + f" | evaluate at {', '.join(map(str, m.eval_lengths))}")
    return "\n".join(lines + ["cost:", *cost_lines(exp)])


def cost_lines(exp: Experiment) -> list[str]:
    """The trainings and evaluations of the sweep and of the plain run, and their samples."""
    spec, out = exp.spec, []
    methods = list(dict.fromkeys(m.method for m in exp.trained if m.group in spec["methods"] or exp.sweep))
    tasks = len(eval_tasks(spec))

    def evals(n, dev):
        lengths = ((spec.get("sweep") or {}).get("dev") or {}).get("lengths", []) if dev else spec["evaluation"]["lengths"]
        k = samples_per_task(spec, dev) if lengths else 0
        return (f"{n} evaluations of {k} samples a task x {tasks} tasks = {k * tasks} a length at "
                f"{', '.join(map(str, lengths))} (seed {((spec.get('sweep') or {}).get('dev') or {}).get('seed', 1) if dev else 0})")

    if spec.get("sweep"):
        try:
            points = [m for m in sweep_models(spec, methods) if m.method]
        except SpecError as e:
            out.append(f"  sweep: {e}")
        else:
            per = ", ".join(f"{k} {sum(m.method == k for m in points)}" for k in methods)
            out.append(f"  sweep (--sweep): {len(points)} trainings ({per}), {evals(len(points) + 1, True)}, the base's included")
    else:
        out.append("  sweep: none (no `sweep` section)")
    seeds = seeds_of(spec)
    if exp.sweep:
        n = len(methods) * len(seeds)
        out.append(f"  then the run: {n - len(methods)} trainings ({n} models: {len(methods)} methods x {len(seeds)} "
                   f"seed(s), seed 0 of each the sweep's pick), {evals(n + 2, False)}")
    else:
        trained = exp.trained
        reused = sum(1 for m in trained if m.reuse)
        out.append(f"  run: {len(trained) - reused} trainings ({len(trained)} models"
                   + (f"; {reused} of them the sweep's picks, trained by the sweep" if reused else
                      f"; after a sweep, {len(methods)} fewer: seed 0 of each method is its pick") + "), "
                   + evals(len(exp.models), False))
    return out
