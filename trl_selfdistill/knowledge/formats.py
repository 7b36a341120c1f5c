"""The answer format: one object for training rows, few-shot probes, zero-shot evaluation and answer parsing.

Knowledge must be measured in the format the fine-tuning teaches; otherwise a change of format (a one-word answer
instead of a sentence) reads as forgetting.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from datasets import Dataset

from ..validation import check_facts, check_prompt_template

Prompt = str | list[dict[str, str]]
# The question template of each mode when none is given: what the CLI, the callback and `eval` ask with
DEFAULT_PROMPTS = {"plain": "Q: {question}\nA:", "chat": "{question} Reply with the answer only."}


@dataclass(frozen=True)
class AnswerFormat:
    """How a question is asked and how its answer is written, parsed and stopped."""

    prompt: str = field(
        default="Q: {question}\nA:",
        metadata={"help": "Prompt template; `{question}` is replaced by the question."},
    )
    answer_prefix: str = field(
        default=" ", metadata={"help": "Text between the prompt and the answer in plain (non-chat) mode."}
    )
    stop: str = field(
        default="\n",
        metadata={"help": "Ends the answer line: appended to training completions, stops generation, cuts parsing."},
    )
    shot_separator: str = field(
        default="\n", metadata={"help": "Text after each few-shot exemplar (after its `stop`), before the next one."}
    )
    chat: bool = field(
        default=False,
        metadata={"help": "Chat mode: the prompt is a user turn, the answer an assistant turn of the chat template."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "System message in chat mode."})

    def __post_init__(self):
        check_prompt_template(self.prompt)
        if self.system_prompt is not None and not self.chat:
            raise ValueError("`system_prompt` only applies in chat mode: set `chat=True` or drop `system_prompt`.")

    def prompt_for(self, question: str, shots: Sequence[tuple[str, str]] = ()) -> Prompt:
        """Zero-shot (no `shots`) or few-shot prompt; `shots` are `(question, answer)` pairs. Chat mode: messages."""
        if self.chat:
            messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
            for shot_question, shot_answer in shots:
                messages += [
                    {"role": "user", "content": self.prompt.format(question=shot_question)},
                    {"role": "assistant", "content": shot_answer},
                ]
            return messages + [{"role": "user", "content": self.prompt.format(question=question)}]
        blocks = [
            self.prompt.format(question=q) + self.answer_prefix + a + self.stop + self.shot_separator for q, a in shots
        ]
        return "".join(blocks) + self.prompt.format(question=question)

    def completion_for(self, answer: str) -> Prompt:
        """The training target for `answer`, in the shape TRL's prompt-completion datasets expect."""
        if self.chat:
            return [{"role": "assistant", "content": answer}]
        return self.answer_prefix + answer + self.stop

    def training_dataset(self, facts: Dataset) -> Dataset:
        """`prompt`/`completion` rows for `SFTTrainer`, each fact answered with its first alias."""
        check_facts(facts, "training fact set", categories=False, ids=False)
        return facts.map(
            lambda fact: {
                "prompt": self.prompt_for(fact["question"]),
                "completion": self.completion_for(fact["answers"][0]),
            },
            remove_columns=facts.column_names,
        )

    def parse(self, generated: str) -> str:
        """The answer in a generated continuation: its first line (up to `stop`), stripped."""
        return (generated.split(self.stop)[0] if self.stop else generated).strip()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def for_data(cls, conversational: bool, prompt: str | None = None, system_prompt: str | None = None):
        """The format that matches the training data: chat (the chat template) for conversational data, else plain
        text, each with its `DEFAULT_PROMPTS` template unless `prompt` is given."""
        mode = "chat" if conversational else "plain"
        return cls(prompt=prompt or DEFAULT_PROMPTS[mode], chat=conversational, system_prompt=system_prompt)
