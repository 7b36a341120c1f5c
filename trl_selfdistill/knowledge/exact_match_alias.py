"""`evaluate` metric: exact match against any gold alias after normalisation (`knowledge.facts.is_correct`).

Load it offline from the installed package:

    import evaluate
    from trl_selfdistill.knowledge import EXACT_MATCH_METRIC_PATH

    metric = evaluate.load(EXACT_MATCH_METRIC_PATH)
    metric.compute(predictions=["paris"], references=[["Paris", "City of Light"]])  # {"exact_match": 1.0}
"""

import datasets
import evaluate

from trl_selfdistill.knowledge.facts import is_correct

_DESCRIPTION = "Share of predictions that equal one of their gold aliases after SQuAD-style normalisation."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): one answer per question.
    references (`list[list[str]]`): the gold aliases of each question.
Returns:
    exact_match (`float`): share of predictions matching one of their aliases, in [0, 1].
"""
_CITATION = """@inproceedings{gekhman2024finetuning,
  title={Does Fine-Tuning LLMs on New Knowledge Encourage Hallucinations?},
  author={Gekhman, Zorik and Yona, Gal and Aharoni, Roee and Eyal, Matan and Feder, Amir and Reichart, Roi and
          Herzig, Jonathan},
  booktitle={EMNLP},
  year={2024}
}"""


class ExactMatchAlias(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("No predictions to score: pass at least one prediction with its aliases.")
        correct = [
            is_correct(prediction, aliases) for prediction, aliases in zip(predictions, references, strict=True)
        ]
        return {"exact_match": sum(correct) / len(correct)}
