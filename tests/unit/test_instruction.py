"""Instruction data and encoding: readers and their errors, exact loss masks, eos, truncation."""
import json

import pytest
import torch
import torch.nn.functional as F

from tunelab.config import resolve_config
from tunelab.data.instructions import load_instruction_data, read_file, read_prompts
from tunelab.errors import ConfigError, DataError
from tunelab.tasks import get_task
from tunelab.tasks.instruction import (IGNORE, InstructionMetrics, InstructionSettings,
                                       encode_conversations, show_example)

TEXTS = ["user assistant system say hello there", "count one two three", "ping pong again",
         "Below is an instruction that describes a task. Write a response that appropriately "
         "completes the request. ### Instruction: ### Response:"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tunelab.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("llama") / "m", kind="llama",
                                texts=TEXTS, vocab_size=320))


@pytest.fixture(scope="module")
def task_for(tiny_llama):
    """A task factory: InstructionTask for the tiny llama with extra overrides."""
    def make(*overrides):
        return get_task(resolve_config(overrides=["task.name=instruction",
                                                  f"model.name={tiny_llama}",
                                                  "model.max_length=64", *overrides]))
    return make


@pytest.fixture(scope="module")
def built(task_for):
    return task_for().build_model([])


def write_json(path, records):
    path.write_text(json.dumps(records, indent=1))
    return str(path)


def write_jsonl(path, records, blank_after_first=False):
    lines = [json.dumps(r) for r in records]
    if blank_after_first:
        lines.insert(1, "")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def chat(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def conversations(task, records, tmp_path):
    conv, problems = read_file(write_jsonl(tmp_path / "c.jsonl", records), task.settings)
    assert not problems, problems
    return conv


# --------------------------------------------------------------------------------------------
# readers


def test_alpaca_records_become_messages(tmp_path):
    settings = InstructionSettings(system_prompt="Be brief.")
    path = write_json(tmp_path / "a.json", [
        {"instruction": "Add", "input": "1 and 2", "output": "3"},
        {"instruction": "Greet", "input": "", "output": "hi", "system": "Be kind.",
         "history": [["Who are you?", "A bot."]]}])
    (first, second), problems = read_file(path, settings)
    assert not problems
    assert first.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Add\n\n1 and 2"},
                              {"role": "assistant", "content": "3"}]
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user",
                                                    "assistant"]
    assert second.messages[0]["content"] == "Be kind."  # the record's own wins
    assert second.messages[1]["content"] == "Who are you?"
    assert first.style == "alpaca" and first.source == f"{path} record 1"


def test_chat_sharegpt_and_renamed_fields(tmp_path):
    settings = InstructionSettings(instruction_field="question", output_field="answer")
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                      {"role": "assistant", "content": [{"type": "text", "text": "b"}]}]},
        {"conversations": [{"from": "human", "value": "c"}, {"from": "gpt", "value": "d"}]},
        {"question": "e", "answer": "f"}])
    found, problems = read_file(path, settings)
    assert not problems
    assert [c.style for c in found] == ["chat", "sharegpt", "alpaca"]
    assert found[0].messages[2] == {"role": "assistant", "content": "b"}
    assert found[1].messages == [{"role": "user", "content": "c"},
                                 {"role": "assistant", "content": "d"}]
    assert found[2].messages[-1]["content"] == "f" and found[2].source == f"{path}:3"


@pytest.mark.parametrize("record, field, reason", [
    ({"instruction": "x"}, "output", "missing output"),
    ({"instruction": "x", "output": "  "}, "output", "empty response"),
    ({"output": "y"}, "instruction", "missing instruction"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "history",
     "bad history (item 1 is not a [prompt, response] pair of texts)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "messages", "roles out of order (message 2 is 'user' after 'user'; expected 'assistant')"),
    ({"messages": [{"role": "user", "content": "a"}]}, "messages", "no assistant turn"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                   {"role": "user", "content": "c"}]}, "messages",
     "roles out of order (ends with a user message: no response to learn)"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
     "messages", "empty response (message 2)"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]},
     "conversations", "unknown role 'tool'"),
    ({"text": "plain"}, None, "unknown layout"),
])
def test_unusable_records_are_dropped_with_place_and_reason(tmp_path, record, field, reason):
    good = {"instruction": "ok", "output": "fine"}
    path = write_jsonl(tmp_path / "d.jsonl", [good, record], blank_after_first=True)
    kept, problems = read_file(path, InstructionSettings())
    assert len(kept) == 1 and len(problems) == 1
    problem = problems[0]
    assert problem.line == 3  # the blank line 2 counts: it is the file's line number
    assert problem.column == field and problem.reason.startswith(reason)
    assert problem.where().startswith(f"{path}:3")


def test_json_list_problems_name_the_record(tmp_path):
    path = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"},
                                            {"instruction": "c", "output": ""}])
    _, problems = read_file(path, InstructionSettings())
    assert problems[0].where() == f"{path} record 2 field 'output'"
    assert problems[0].reason == "empty response"


def test_a_file_without_usable_records_names_its_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}] * 2)
    with pytest.raises(DataError) as e:
        read_file(path, InstructionSettings())
    assert "2 dropped: 2 unknown layout" in str(e.value)
    assert "prompt, completion" in str(e.value) and "task.*_field" in str(e.value)


def test_other_formats_are_refused(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("1 hello\n")
    with pytest.raises(DataError, match="instruction data must be one of"):
        read_file(str(path), InstructionSettings())


def test_validation_split_by_ratio_is_seeded_or_from_a_file(tmp_path):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "t.jsonl", records + [{"instruction": "bad"}])
    cfg = resolve_config(overrides=[f"data.train={path}", "data.validation_ratio=0.25"]).data
    one = load_instruction_data(cfg, InstructionSettings())
    two = load_instruction_data(cfg, InstructionSettings())
    sizes = {k: len(v) for k, v in one.splits.items()}
    assert sizes == {"train": 30, "validation": 10}
    assert [c.source for c in one.splits["validation"]] == \
        [c.source for c in two.splits["validation"]]
    assert not {c.source for c in one.splits["train"]} & {c.source for c in
                                                          one.splits["validation"]}
    pre = one.preflight()
    assert pre["dropped"] == {"missing output": 1} and pre["splits"]["train"]["responses"] == 30
    val = write_jsonl(tmp_path / "v.jsonl", [chat("x", "y")])
    cfg = resolve_config(overrides=[f"data.train={path}", f"data.validation={val}",
                                    "data.max_train_rows=5"]).data
    data = load_instruction_data(cfg, InstructionSettings())
    assert len(data.splits["train"]) == 5 and len(data.splits["validation"]) == 1


def test_prompts_for_prediction_leave_the_reference_out(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "q"},
                                              {"instruction": "q2", "output": "ref"},
                                              chat("a", "b", "c", "d")])
    rows, prompts = read_prompts(path, InstructionSettings())
    assert rows[1]["output"] == "ref"
    assert prompts[0] == prompts[0][:1] == [{"role": "user", "content": "q"}]
    assert prompts[1] == [{"role": "user", "content": "q2"}]
    assert [m["content"] for m in prompts[2]] == ["a", "b", "c"]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "q"}, {"messages": []}])
    with pytest.raises(DataError, match=r"bad.jsonl:2 column 'messages': no user turn"):
        read_prompts(bad, InstructionSettings())


# --------------------------------------------------------------------------------------------
# encoding


def counted_positions(labels):
    """Token positions that are targets: labels are shifted, so label t is token t + 1."""
    return [t + 1 for t, y in enumerate(labels) if y != IGNORE]


def segments(tokenizer, ids, positions):
    """Decoded runs of consecutive positions."""
    runs, current = [], []
    for p in positions:
        if current and p != current[-1] + 1:
            runs.append(current)
            current = []
        current.append(p)
    runs.append(current)
    return [tokenizer.decode([ids[p] for p in run]) for run in runs]


def test_only_response_tokens_and_eos_count_token_by_token(task_for, built, tmp_path):
    task, tok = task_for(), built.tokenizer
    conv = conversations(task, [chat("say hello", "hello there")], tmp_path)
    enc = task.encode(tok, conv)
    ids, labels = enc.input_ids[0], enc.labels[0]
    text = tok.apply_chat_template(conv[0].messages, tokenize=False)
    response = "hello there<|im_end|>"
    start = text.index(response)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert tok(text, add_special_tokens=False)["input_ids"] == ids
    expected = [t for t, (s, _) in enumerate(offsets) if start <= s < start + len(response)]
    assert counted_positions(labels) == expected
    assert ids[expected[-1]] == tok.eos_token_id  # the eos ends the counted run
    assert segments(tok, ids, expected) == [response]
    assert all(labels[t] == ids[t + 1] for t in range(len(ids) - 1) if labels[t] != IGNORE)
    assert labels[-1] == IGNORE and enc.eos_appended == 0 and enc.responses == 1


def test_every_assistant_turn_counts(task_for, built, tmp_path):
    task, tok = task_for("task.system_prompt=be nice"), built.tokenizer
    conv = conversations(task, [chat("hi", "yo", "again", "yo yo")], tmp_path)
    enc = task.encode(tok, conv)
    positions = counted_positions(enc.labels[0])
    assert segments(tok, enc.input_ids[0], positions) == ["yo<|im_end|>", "yo yo<|im_end|>"]
    shown = show_example(tok, enc, 0)
    assert "«yo<|im_end|>»" in shown and "«yo yo<|im_end|>»" in shown
    assert "<|im_start|>system\n  be nice" in shown  # every line indented
    assert "template: chatml" in shown  # the tiny llama's own template is plain ChatML


def test_alpaca_template_writes_the_eos(task_for, tmp_path):
    task = task_for("task.template=alpaca", "model.max_length=128")
    tok = task.build_model([]).tokenizer
    conv = conversations(task, [{"instruction": "count", "input": "one two",
                                 "output": "three"}], tmp_path)
    enc = task.encode(tok, conv)
    text = tok.decode(enc.input_ids[0])
    assert text.startswith("Below is an instruction") and "### Instruction:\ncount\n\none two" \
        in text and text.endswith("### Response:\nthree<|im_end|>\n\n")
    assert segments(tok, enc.input_ids[0], counted_positions(enc.labels[0])) == \
        ["three<|im_end|>"]
    assert enc.eos_appended == 0


def test_eos_is_appended_when_the_template_has_none(task_for, tmp_path):
    task = task_for()
    tok = task.build_model([]).tokenizer
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}"
                         "{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}"
                         "{% endif %}")
    conv = conversations(task, [chat("ping", "pong", "again", "pong pong")], tmp_path)
    enc = encode_conversations(tok, conv, 64)
    ids = enc.input_ids[0]
    assert enc.eos_appended == 2 and ids.count(tok.eos_token_id) == 2
    assert segments(tok, ids, counted_positions(enc.labels[0])) == \
        ["pong<|im_end|>", "pong pong<|im_end|>"]
    assert tok.decode(ids).endswith("pong pong<|im_end|>\n")  # before the template's newline
    assert "appended to 2 of 2 responses" in show_example(tok, enc, 0)


def test_template_that_rewrites_history_is_refused(task_for, tmp_path):
    task = task_for()
    tok = task.build_model([]).tokenizer
    # numbers turns from the end: earlier turns render differently once more follow
    tok.chat_template = ("{% for m in messages %}{{ (messages|length - loop.index)|string + "
                         "m['content'] + eos_token }}{% endfor %}")
    conv = conversations(task, [chat("a", "b")], tmp_path)
    with pytest.raises(ConfigError, match="turn by turn"):
        encode_conversations(tok, conv, 64)


def test_truncation_keeps_cut_responses_and_drops_unreachable_ones(task_for, built, tmp_path):
    task, tok = task_for("model.max_length=20"), built.tokenizer
    conv = conversations(task, [chat("hello " * 30, "there"),
                                chat("ping", "pong " * 30),
                                chat("ping", "pong")], tmp_path)
    enc = task.encode(tok, conv)
    assert len(enc) == 2 and enc.truncated == 1 and max(enc.lengths) == 20
    assert len(enc.dropped) == 1 and enc.dropped[0].kind() == "response cut off"
    assert enc.dropped[0].where() == f"{tmp_path / 'c.jsonl'}:1"
    cut = enc.labels[enc.lengths.index(20)]
    assert tok.eos_token_id not in [y for y in cut]  # the eos was cut off with the rest


def test_train_on_prompt_counts_every_token(task_for, built, tmp_path):
    task = task_for("task.train_on_prompt=true")
    enc = task.encode(built.tokenizer, conversations(task, [chat("a b", "c")], tmp_path))
    assert counted_positions(enc.labels[0]) == list(range(1, len(enc.input_ids[0])))


def test_loss_equals_plain_cross_entropy_on_the_responses(task_for, built, tmp_path):
    task, model = task_for(), built.model.eval()
    conv = conversations(task, [chat("say hello", "hello there"),
                                chat("count one two three four", "three"),
                                chat("hi", "yo", "again", "yo yo")], tmp_path)
    enc = task.encode(built.tokenizer, conv)
    batch = task.collate(enc, [0, 1, 2], built.tokenizer.pad_token_id)
    assert batch["logits_to_keep"][0] > 0  # prompt positions are not projected
    with torch.no_grad():
        trimmed = model(**task.model_inputs(batch)).logits
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, items = task.loss_sum(trimmed, batch)
    expected = F.cross_entropy(full.flatten(0, 1), batch["labels"].flatten(),
                               ignore_index=IGNORE, reduction="sum")
    assert items == task.count_items(batch) == sum(len(counted_positions(y))
                                                   for y in enc.labels)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    metrics = InstructionMetrics()
    metrics.update(trimmed, batch)
    values = metrics.compute()
    assert values["loss"] == pytest.approx(expected.item() / items, rel=1e-5)
    assert values["perplexity"] == pytest.approx(torch.exp(expected / items).item(), rel=1e-5)
    again = InstructionMetrics()
    again.load_state(metrics.state())
    assert again.compute() == values and "response tokens" in again.report()


def test_settings_are_checked(task_for, tiny_bert):
    with pytest.raises(ConfigError, match="task.template must be one of auto, alpaca, chatml"):
        task_for("task.template=vicuna")
    with pytest.raises(ConfigError, match="unknown key task.prompt_field"):
        task_for("task.prompt_field=q")
    with pytest.raises(ConfigError, match="needs a decoder"):
        task_for(f"model.name={tiny_bert}").build_model([])
