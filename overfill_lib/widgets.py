"""Widgets the notebooks share. Each also renders its default state as plain output, so a notebook
executed in batch (papermill) shows something sensible where no widget can run."""

from __future__ import annotations

from IPython.display import display

from overfill_lib.workbook import in_batch


def ask_teacher(model, tokenizer, records: list[dict]):
    """Family dropdown + editable input -> the model's greedy answer beside the reference."""
    import ipywidgets as w

    from overfill_lib import tasks, teacher

    by_family = {f: next(r for r in records if r["family"] == f) for f in dict.fromkeys(r["family"] for r in records)}
    family = w.Dropdown(options=list(by_family), description="family")
    user = w.Text(value=by_family[family.value]["messages"][1]["content"], description="input")
    out = w.Output()

    def answer(*_):
        record = by_family[family.value]
        messages = [record["messages"][0], {"role": "user", "content": user.value}, {"role": "assistant", "content": ""}]
        pred = teacher.greedy_answers(model, tokenizer, [{"family": family.value, "messages": messages}])[0]
        reference = record["messages"][-1]["content"] if user.value == record["messages"][1]["content"] else "(edited)"
        return f"model: {pred!r}   reference: {reference!r}   exact: {tasks.exact_match(pred, reference)}"

    def refresh(*_):
        text = answer()  # computed outside the Output context: the model's own output must not land there
        out.clear_output()
        with out:
            print(text)

    def on_family(change):
        user.value = by_family[change["new"]]["messages"][1]["content"]

    family.observe(on_family, names="value")
    user.observe(refresh, names="value")
    refresh()
    display(w.VBox([w.HBox([family, user]), out]))
    if in_batch():
        print(answer())
