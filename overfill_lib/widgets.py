"""Widgets the notebooks share. Each also renders its default state as plain output, so a notebook
executed in batch (papermill) shows something sensible where no widget can run."""

from __future__ import annotations

from IPython.display import display

from overfill_lib.artifacts import in_batch


def _text_panel(compute, controls: list, watch: list | None = None) -> None:
    """Show ``controls`` in a row above an ``Output`` holding ``compute()``'s text, recomputed whenever a
    ``watch`` control (default: every control) changes value. Executed in batch, the text is also printed.

    The text is computed outside the Output context (a model's own log lines must not land there), and
    once for both the widget and the batch print.
    """
    import ipywidgets as w

    out = w.Output()

    def refresh(*_):
        text = compute()
        out.clear_output()
        with out:
            print(text)
        return text

    for control in controls if watch is None else watch:
        control.observe(refresh, names="value")
    text = refresh()
    display(w.VBox([w.HBox(controls), out]))
    if in_batch():
        print(text)


def ask_full_model(model, tokenizer, records: list[dict]):
    """Family dropdown + editable input -> the model's greedy answer beside the reference."""
    import ipywidgets as w

    from overfill_lib import scoring

    by_family = {f: next(r for r in records if r["family"] == f) for f in dict.fromkeys(r["family"] for r in records)}
    family = w.Dropdown(options=list(by_family), description="family")
    user = w.Text(value=by_family[family.value]["messages"][1]["content"], description="input")

    def answer():
        record = by_family[family.value]
        messages = [record["messages"][0], {"role": "user", "content": user.value}, {"role": "assistant", "content": ""}]
        pred = scoring.greedy_answers(model, tokenizer, [{"family": family.value, "messages": messages}])[0]
        reference = record["messages"][-1]["content"] if user.value == record["messages"][1]["content"] else "(edited)"
        return f"model: {pred!r}   reference: {reference!r}   exact: {scoring.answer_matches(pred, reference)}"

    def on_family(change):  # a new family loads its example input, which triggers the answer
        user.value = by_family[change["new"]]["messages"][1]["content"]

    family.observe(on_family, names="value")
    _text_panel(answer, [family, user], watch=[user])


def pruning_slider(model, importances: dict, eval_fn, *, ratios=None, default: float = 0.5, dtype_bytes=2,
                   reference: dict | None = None):
    """Criterion dropdown + ratio slider -> the pruned model's sizes, parameters, decode bytes and ``eval_fn`` metrics.

    The ratio is the fraction removed from hidden channels and MLP neurons (as in pruning.sweep).
    ``reference``: the unpruned model's metrics, shown beside. Executed in batch, prints the default.
    """
    import ipywidgets as w

    from overfill_lib import cost, pruning

    ratios = list(ratios) if ratios is not None else [round(0.05 * i, 2) for i in range(19)]
    criterion = w.Dropdown(options=list(importances), description="criterion")
    ratio = w.SelectionSlider(options=ratios, value=min(ratios, key=lambda r: abs(r - default)),
                              description="removed", continuous_update=False)
    full_params = sum(p.numel() for p in model.parameters())

    def describe():
        row = pruning.sweep(model, {criterion.value: importances[criterion.value]}, [ratio.value], eval_fn,
                            dtype_bytes=dtype_bytes, progress=False).iloc[0]
        metrics = "; ".join(
            f"{k} {row[k]:.4f}" + (f" (unpruned {reference[k]:.4f})" if reference and k in reference else "")
            for k in row.index if k not in _SWEEP_COLUMNS
        )
        return (f"{criterion.value}, {ratio.value:.0%} removed: hidden {row.hidden_size}, intermediate "
                f"{row.intermediate_size}; {row.parameters:,} parameters ({row.parameters / full_params:.1%} of the "
                f"full model); one decode step reads {row.decode_bytes / 1e6:.3f} MB of weights "
                f"({cost.dtype_bytes(dtype_bytes):g} B/parameter); {metrics}")

    _text_panel(describe, [criterion, ratio])


_SWEEP_COLUMNS = {"criterion", "ratio", "heads", "hidden_size", "intermediate_size", "num_attention_heads",
                  "parameters", "decode_bytes"}


def compare_answers(models: dict, tokenizer, records: list[dict], max_new_tokens: int = 16):
    """Family dropdown + editable input -> every model's greedy answer to the same prompt, side by side, with its
    wall time (OverFill pairs also split it into full-model prefill and decoder steps). Executed in batch,
    the table for the default input is printed as well."""
    import ipywidgets as w
    import pandas as pd

    from overfill_lib import scoring

    by_family = {f: next(r for r in records if r["family"] == f) for f in dict.fromkeys(r["family"] for r in records)}
    family = w.Dropdown(options=list(by_family), description="family")
    user = w.Text(value=by_family[family.value]["messages"][1]["content"], description="input")
    out = w.Output()

    def table():
        record = by_family[family.value]
        messages = [record["messages"][0], {"role": "user", "content": user.value}]
        reference = record["messages"][-1]["content"] if user.value == record["messages"][1]["content"] else None
        rows = []
        for name, model in models.items():
            row = scoring.answer_with_latency(model, tokenizer, messages, max_new_tokens=max_new_tokens)
            rows.append({"model": name, **row, "exact": None if reference is None else scoring.answer_matches(row["answer"], reference)})
        df = pd.DataFrame(rows).set_index("model")
        df.attrs["reference"] = reference
        return df

    def refresh(*_):
        df = table()  # computed outside the Output context: generation logs must not land there
        out.clear_output()
        with out:
            print(f"reference: {df.attrs['reference'] if df.attrs['reference'] is not None else '(edited input)'}")
            display(df)
        return df

    def on_family(change):
        user.value = by_family[change["new"]]["messages"][1]["content"]

    family.observe(on_family, names="value")
    user.observe(refresh, names="value")
    df = refresh()
    display(w.VBox([w.HBox([family, user]), out]))
    if in_batch():
        print(f"reference: {df.attrs['reference']}")
        display(df)


def retention_explorer(table, default: float = 0.9):
    """Retention slider -> per family, the narrowest decoder (OverFill and pruned) still holding that fraction
    of the full model's score, and the size rule at that threshold (``ablation.aggregate`` table).
    Executed in batch, prints the default."""
    import ipywidgets as w

    from overfill_lib import ablation

    level = w.FloatSlider(value=default, min=0.5, max=1.0, step=0.01, description="holds ≥", readout_format=".0%",
                          continuous_update=False)

    def report():
        robust = ablation.family_robustness(table, level.value)
        column = next(c for c in robust.columns if c.startswith("narrowest keep holding"))
        wide = robust.pivot(index="family", columns="method", values=column)
        rule = ablation.size_rule(table, level.value)
        return (f"narrowest kept fraction holding {level.value:.0%} of the full model:\n{wide.to_string()}\n\n"
                f"rule: {rule['statement']}")

    _text_panel(report, [level])


def reference_generations(full, importance, tokenizer, conversations: list[list[dict]], *, ratios, default: float = 0.5,
                          max_new_tokens: int = 48):
    """Prompt dropdown + ratio slider -> the full model, the pruned decoder alone and the untrained pair (full-model
    prefill, pruned decoder after) answering the same prompt, side by side. Executed in batch, prints the default."""
    import ipywidgets as w

    from overfill_lib import pruning
    from overfill_lib.pair import compare_generations

    labels = [f"{i}: {c[-1]['content'][:70]!r}" for i, c in enumerate(conversations)]
    prompt = w.Dropdown(options=list(zip(labels, range(len(conversations)))), description="prompt",
                        layout={"width": "60%"})
    ratio = w.SelectionSlider(options=list(ratios), value=min(ratios, key=lambda r: abs(r - default)),
                              description="removed", continuous_update=False)

    def replies():
        decoder, _ = pruning.prune_width(full, importance, hidden=ratio.value, intermediate=ratio.value)
        row = compare_generations(full, decoder, tokenizer, [conversations[prompt.value]],
                                  max_new_tokens=max_new_tokens, pair_label="OverFill, untrained").iloc[0]
        titles = {"full model": "full model",
                  "decoder alone": f"pruned decoder alone ({ratio.value:.0%} of hidden and MLP width removed)",
                  "OverFill, untrained": "OverFill, untrained (full-model prefill, then that decoder)"}
        return "\n\n".join(f"--- {title}\n{row[name]}" for name, title in titles.items())

    _text_panel(replies, [prompt, ratio])


def side_by_side(lineup: dict, tokenizer, records: list[dict], *, max_new_tokens: int = 64):
    """Prompt dropdown -> every model's greedy reply to the same held-out prompt, beside the full model's recorded
    answer. ``lineup`` maps a name to a causal LM or an OverFill pair. Executed in batch, prints the first prompt's."""
    import ipywidgets as w

    from overfill_lib.pair import OverFillModel

    labels = [f"{i}: {r['messages'][-2]['content'][:70]!r}" for i, r in enumerate(records)]
    prompt = w.Dropdown(options=list(zip(labels, range(len(records)))), description="prompt", layout={"width": "60%"})

    def replies():
        record = records[prompt.value]
        conversation = record["messages"][:-1]
        lines = [f"--- recorded full-model answer\n{record['messages'][-1]['content']}"]
        for name, model in lineup.items():
            pair = model if isinstance(model, OverFillModel) else OverFillModel(model, model, tokenizer=tokenizer)
            lines.append(f"--- {name}\n{pair.chat([conversation], max_new_tokens=max_new_tokens).texts[0]}")
        return "\n\n".join(lines)

    _text_panel(replies, [prompt])


def speculative_explorer(results: dict) -> None:
    """Pair, acceptance rate and draft length -> speculative decoding's modelled ms per token (from the draft and
    verify costs measured at the base point of a ``latency.run_suite`` result) beside OverFill's measured one."""
    import ipywidgets as w

    from overfill_lib import cost

    settings = results["settings"]
    base = {"batch": 1, "prompt": settings["base_prompt"], "new_tokens": settings["base_new_tokens"]}
    at_base = [r for r in results["speculative_model"] if all(r.get(k) == v for k, v in base.items())]
    costs = {(r["pair"], r["gamma"]): (r["draft_step_s"], r["verify_s"]) for r in at_base}
    overfill_ms = {r["pair"]: 1000 * r["per_token_s"]["median"] for r in results["records"]
                   if r.get("method") == "overfill" and r.get("status") == "ok" and r["path"].startswith("fast")
                   and all(r.get(k) == v for k, v in base.items())}
    if not costs:
        print("no draft/verify costs were measured at the base point")
        return
    pair = w.Dropdown(options=sorted({p for p, _ in costs}), description="pair")
    alpha = w.FloatSlider(value=0.7, min=0.0, max=1.0, step=0.05, description="alpha")
    gamma = w.Dropdown(options=sorted({g for _, g in costs}), description="draft len")

    def explain():
        draft_s, verify_s = costs[(pair.value, gamma.value)]
        spec_ms = 1000 * cost.speculative_per_token_s(alpha.value, gamma.value, draft_s, verify_s)
        ours = overfill_ms.get(pair.value)
        versus = "" if ours is None else f"   OverFill (measured): {ours:.3f} ms -> speculative is {ours / spec_ms:.2f}x OverFill's speed"
        return f"speculative (modelled, alpha={alpha.value:.2f}, draft len {gamma.value}): {spec_ms:.3f} ms/token{versus}"

    _text_panel(explain, [pair, alpha, gamma])
