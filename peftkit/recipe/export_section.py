"""The recipe's `export` section: what a run writes (its adapter, a merged model, its report) and where it pushes
the adapter on the Hugging Face Hub."""

from __future__ import annotations

import re

from pydantic import field_validator, model_validator

from peftkit.recipe.model_section import DType
from peftkit.section import Section

class ExportConfig(Section):
    """What the run writes."""

    output_dir: str
    """Run directory: adapter/, merged/, checkpoints/, metrics.jsonl, recipe.yaml, manifest.json."""
    adapter: bool = True
    """Write adapter/ in Hugging Face PEFT format."""
    merged: bool = False
    """Write merged/: the base with the adapter folded in, plus the tokenizer."""
    merged_dtype: DType | None = None
    """Dtype of the merged weights; default: the base model's dtype."""
    best: bool | str = False
    """Export the adapter of the best evaluation instead of the last: true picks by training.early_stopping's
    metric (eval loss without early stopping); a metric name (`loss`, `exact_match`, ...; another set's of
    data.eval as `NAME.loss`) picks by that one. Needs data.eval and training.eval_steps."""
    report: bool = True
    """Write report/ (report.html and its plots, as `peftkit report` does) when the run ends."""
    push_to_hub: str | None = None
    """Hugging Face Hub repository (`user/name`) that adapter/ is pushed to when the run has finished and exported,
    as `peftkit push RUN_DIR user/name` does (to main or push_revision, created where absent with the owner's default
    visibility or private with push_private; refused where the branch holds an earlier push's files adapter/ lacks;
    recorded in manifest.json's `pushed_to_hub`). merged/ is not pushed: `peftkit push RUN_DIR
    user/other --merged` does. Offline (HF_HUB_OFFLINE) or without a token the run is refused before it starts."""
    push_private: bool = False
    """push_to_hub's repository is created private (`peftkit push --private`); an existing public one is refused,
    nothing pushed."""
    push_revision: str | None = None
    """The branch push_to_hub commits to, created from main where absent (`peftkit push --revision`); null: main."""

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo_id: str | None) -> str | None:
        from huggingface_hub.errors import HFValidationError
        from huggingface_hub.utils import validate_repo_id

        if repo_id is None:
            return None
        if repo_id.count("/") != 1:  # a bare name goes to whichever account the token is (as `peftkit push` says)
            raise ValueError(f"{repo_id!r} is no Hub repository id: give user/name (or organization/name)")
        try:
            validate_repo_id(repo_id)
        except HFValidationError as e:
            raise ValueError(f"{repo_id!r} is no Hub repository id ({str(e).rstrip('.')})") from None
        return repo_id

    @field_validator("push_revision")
    @classmethod
    def _branch(cls, revision: str | None) -> str | None:
        if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):  # create_branch would name a branch so
            raise ValueError(f"export.push_revision {revision} is a commit id, and a push makes a commit on a branch: "
                             "give the branch's name (created from main where absent)")
        if revision is not None and not revision.strip():
            raise ValueError("export.push_revision is empty: give a branch's name, or null for main")
        return revision

    @model_validator(mode="after")
    def _push_needs_adapter(self) -> ExportConfig:
        how = (f"export.push_revision {self.push_revision!r}" if self.push_revision is not None
               else "export.push_private: true" if self.push_private else None)
        if how and not self.push_to_hub:
            raise ValueError(f"{how} is how export.push_to_hub pushes, and export.push_to_hub is not set: set it "
                             f"(user/name), or remove {how.split()[0].rstrip(':')}")
        if self.push_to_hub and not self.adapter:
            raise ValueError("export.push_to_hub pushes the run's adapter/, and export.adapter is false: set it true "
                             f"(merged/ is pushed by `peftkit push RUN_DIR {self.push_to_hub} --merged`)")
        return self
