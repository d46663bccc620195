"""The unit of knowledge an edit writes: a subject, a relation template and a new object."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import InvalidRequest


@dataclass(frozen=True)
class Fact:
    """"The mother tongue of {} is" + "Danielle Darrieux" -> "English".

    ``prompt`` holds exactly one ``{}`` for the subject. Targets are stored as given; the
    tokenization helpers add the leading space a model needs between prompt and target.
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str = ""
    paraphrase_prompts: tuple[str, ...] = field(default_factory=tuple)
    neighborhood_prompts: tuple[str, ...] = field(default_factory=tuple)

    @property
    def text(self) -> str:
        """The rewrite prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject)

    def validate(self, index: int = 0) -> None:
        where = f"facts[{index}]"
        count = self.prompt.count("{}")
        if count != 1:
            raise InvalidRequest(
                f"{where}.prompt must contain exactly one '{{}}' for the subject, found {count}: {self.prompt!r}"
            )
        if not self.subject.strip():
            raise InvalidRequest(f"{where}.subject is empty")
        if not self.target_new.strip():
            raise InvalidRequest(f"{where}.target_new is empty")
        if self.target_true and self.target_true.strip() == self.target_new.strip():
            raise InvalidRequest(f"{where}.target_new equals target_true ({self.target_new!r}): nothing to edit")
        if not self.prompt.replace("{}", "").strip():
            raise InvalidRequest(f"{where}.prompt has no text besides the subject placeholder")


def validate_facts(facts: list[Fact] | tuple[Fact, ...]) -> None:
    if not facts:
        raise InvalidRequest("an edit needs at least one fact")
    for i, fact in enumerate(facts):
        fact.validate(i)
