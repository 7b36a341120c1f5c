"""Standard closed-book QA sets load as facts through a column mapping (local files shaped like the Hub datasets)."""

from pathlib import Path

import pytest

from trl_selfdistill.knowledge import is_correct, load_facts

QA_SETS = Path(__file__).parent / "data" / "qa_sets"


def test_nq_open_answer_list():
    facts = load_facts(QA_SETS / "nq_open.jsonl", answers_column="answer")
    assert facts["answers"][0] == ["Paris", "Paris, France"]
    assert facts["question"][1] == "who wrote the play hamlet" and "answer" not in facts.column_names


@pytest.mark.parametrize("column", ["answer", "answer.aliases"])
def test_triviaqa_nested_aliases(column):
    facts = load_facts(QA_SETS / "triviaqa_rc_nocontext.jsonl", answers_column=column)
    sinclair = facts[0]["answers"]
    assert "Harry Sinclair Lewis" in sinclair and "Lewis, Sinclair" in sinclair
    if column == "answer":  # the whole mapping: value, aliases and normalized aliases pooled
        assert "harry sinclair lewis" in sinclair and sinclair[0] == "Sinclair Lewis"
    else:
        assert sinclair == ["Sinclair Lewis", "Harry Sinclair Lewis", "Lewis, Sinclair"]
    assert facts["question_id"] == ["tc_1", "tc_2"]  # other columns are kept
    assert is_correct("gold (element)", facts[1]["answers"])


def test_triviaqa_normalized_aliases_by_dotted_path():
    facts = load_facts(QA_SETS / "triviaqa_rc_nocontext.jsonl", answers_column="answer.normalized_aliases")
    assert facts[0]["answers"] == ["sinclair lewis", "harry sinclair lewis", "lewis, sinclair"]


def test_popqa_answers_as_a_json_string():
    facts = load_facts(QA_SETS / "popqa.jsonl", answers_column="possible_answers")
    assert facts["answers"] == [["politician", "political leader", "polit."], ["France", "French Republic"]]
    assert facts["id"] == ["4222362", "3300148"]  # PopQA's integer ids become the fact ids
    assert facts["o_aliases"][1] == '["French Republic"]'  # a JSON string in another column stays a string


def test_simpleqa_single_answer_and_renamed_question():
    facts = load_facts(QA_SETS / "simpleqa.jsonl", question_column="problem", answers_column="answer")
    assert facts["question"] == ["In which city is the Louvre museum?", "Who painted the Mona Lisa?"]
    assert facts["answers"] == [["Paris"], ["Leonardo da Vinci"]]
    assert "metadata" in facts.column_names


def test_a_wrong_mapping_names_the_columns_there_are():
    with pytest.raises(ValueError, match=r"no answer list in column 'answers'.*columns: \['answer'\]"):
        load_facts(QA_SETS / "nq_open.jsonl")
    with pytest.raises(ValueError, match="no answer list in column 'answer.alias'"):
        load_facts(QA_SETS / "triviaqa_rc_nocontext.jsonl", answers_column="answer.alias")
    with pytest.raises(ValueError, match="no question string in column 'question'"):
        load_facts(QA_SETS / "simpleqa.jsonl", answers_column="answer")


def test_sft_knowledge_flags_and_probe_flags_map_the_columns(tmp_path):
    from trl_selfdistill.cli import main
    from trl_selfdistill.scripts.sft import KnowledgeArguments, load_knowledge_facts, make_parser

    argv = ["--knowledge_facts", str(QA_SETS / "simpleqa.jsonl"), "--knowledge_question_column", "problem",
            "--knowledge_answers_column", "answer", "--output_dir", str(tmp_path), "--use_cpu", "--bf16", "false"]
    knowledge_args = next(a for a in make_parser().parse_args_and_config(argv) if isinstance(a, KnowledgeArguments))
    facts, exemplars = load_knowledge_facts(knowledge_args, seed=0)
    assert facts["answers"] == [["Paris"], ["Leonardo da Vinci"]] and exemplars is facts
    # `probe` refuses the unmapped set before any model loads, and names the flag that fixes it
    with pytest.raises(ValueError, match="pass `answers_column=`"):
        main(["probe", "--model", "nowhere/x", "--facts", str(QA_SETS / "nq_open.jsonl"), "--out",
              str(tmp_path / "x.jsonl")])
