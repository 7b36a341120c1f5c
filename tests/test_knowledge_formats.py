import pytest
from datasets import Dataset

from trl_selfdistill.knowledge import AnswerFormat, load_facts


def test_few_shot_prompt_matches_the_training_rows():
    fmt = AnswerFormat()
    facts = load_facts([{"question": "Capital of Peru?", "answers": ["Lima", "Lima, Peru"]}])
    row = fmt.training_dataset(facts)[0]
    assert row == {"prompt": "Q: Capital of Peru?\nA:", "completion": " Lima\n"}
    few_shot = fmt.prompt_for("Capital of Chile?", [("Capital of Peru?", "Lima"), ("Capital of Cuba?", "Havana")])
    assert few_shot == "Q: Capital of Peru?\nA: Lima\n\nQ: Capital of Cuba?\nA: Havana\n\nQ: Capital of Chile?\nA:"
    # A shot is exactly a training row, prompt + completion, so probing sees the trained format
    assert few_shot.startswith(row["prompt"] + row["completion"])
    assert fmt.prompt_for("Capital of Chile?") == "Q: Capital of Chile?\nA:"


@pytest.mark.parametrize(
    "generated, expected",
    [(" Paris\nQ: What is", "Paris"), (" Paris", "Paris"), ("\nParis", ""), ("  New Delhi \n\n", "New Delhi")],
)
def test_parse_takes_the_first_line(generated, expected):
    assert AnswerFormat().parse(generated) == expected


def test_custom_format_round_trips():
    fmt = AnswerFormat(prompt="Answer the following question. {question}", answer_prefix="\n", stop=" END")
    assert fmt.completion_for("Lima") == "\nLima END"
    assert fmt.parse("\nLima END more") == "Lima"


def test_chat_format_builds_turns(tokenizer):
    fmt = AnswerFormat(prompt="{question}", chat=True, system_prompt="Answer briefly.")
    messages = fmt.prompt_for("Capital of Chile?", [("Capital of Peru?", "Lima")])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Capital of Chile?"
    rows = fmt.training_dataset(Dataset.from_list([{"question": "Capital of Peru?", "answers": ["Lima"]}]))
    assert rows[0]["completion"] == [{"role": "assistant", "content": "Lima"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("user\nCapital of Chile?<eos>\n<bos>assistant\n")


@pytest.mark.parametrize(
    "kwargs, message",
    [({"prompt": "Q: {q}\nA:"}, r"placeholder\(s\) \{q\}, but only `\{question\}` is filled in"),
     ({"prompt": "Q:\nA:"}, "no `{question}` placeholder"), ({"system_prompt": "Be brief."}, "chat=True")],
)
def test_bad_format_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AnswerFormat(**kwargs)
