"""The model-family interface: what a family (CTC, Whisper, ...) implements, and the one ordered
``setup()`` through which the recipe runner (``speechtune.recipe``) builds its experiment.

A family is one module holding a Brain subclass (forward pass and loss, on
``speechtune.brain.FineTuneBrain``) and a ``Family`` subclass (everything else that differs
between families: texts, tokenizer, label checks, pipelines, modules, export, inference
loading, the tools' model builders). ``speechtune.families`` registers it under its ``name``, the
value of the ``family`` key of its base yaml (``hparams/<family>.yaml``). Code outside the family
modules asks the registry and never switches on a family's name.

``setup`` runs the steps in this order; each needs the ones before it:

1. ``build_model(train_texts)``: the model the yaml's ``model`` key names (a hub id, a local HF
   folder, ``packaged:whisper-base`` or a ``tiny:<preset>`` built here), with gradient
   checkpointing and LoRA adapters in its ``lora_parts`` as the yaml asks
   (``speechtune.adapters.adapt``);
2. ``set_texts(rows, languages)``: each row's scoring reference ``words`` and training
   ``target``, normalised for its split's language;
3. ``build_tokenizer(train_rows)``: the family's tokenizer; returns the characters the
   pre-flight out-of-vocabulary check allows (None: no check);
4. the runner's pre-flight checks, given step 3's characters and ``label_check()``: the
   utterances to drop per split;
5. the datasets, then ``add_pipelines(datasets)``;
6. ``modules()``: the Brain's modules (a CTC head is sized by step 3's tokenizer);
7. the Brain, then ``configure(brain)``.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from speechtune import data


@dataclass
class Setup:
    """What ``Family.setup`` built: the Brain and the datasets (tests by name)."""

    brain: object
    train: object
    valid: object
    tests: dict


class Family(ABC):
    """One model family's recipe setup, export and tool hooks (see the module docstring)."""

    #: the registry name, also the ``family`` key of the family's base yaml and run.json's
    name: ClassVar[str]
    #: the family's Brain (``speechtune.brain.FineTuneBrain`` subclass)
    brain_class: ClassVar[type]
    #: SpeechBrain inference class an export loads with, e.g. ``"EncoderASR"``
    inference_class: ClassVar[str]
    #: transformers processor class of an export's transformers files, for its model card
    processor_class: ClassVar[str]
    #: what the family trains, in a few words (new recipes' yaml headers)
    summary: ClassVar[str]
    #: what the ``language`` key sets (new recipes' yaml comment)
    language_use: ClassVar[str] = "text normaliser (speechtune.text registry)"
    #: ``lora`` values of the yaml -> module-name prefixes of the transformer layers that get
    #: adapters (``speechtune.adapters``), e.g. ``{"encoder": ("encoder.layers",)}``
    lora_parts: ClassVar[dict]
    #: ``tools/benchmark.py``'s default variants
    benchmark_variants: ClassVar[tuple] = ("hf", "recipe")

    def __init__(self, hparams):
        self.hparams = hparams

    def setup(self, rows, languages, run_opts, preflight):
        """Steps 1 to 7 (module docstring). ``rows``: ``{split: {id: manifest row}}`` (training
        rows already within the duration limits); ``preflight(chars, label_check)`` returns
        ``{split: dropped ids}``."""
        self.build_model([r["wrd"] for r in rows["train"].values()])
        self.set_texts(rows, languages)
        chars = self.build_tokenizer(rows["train"])
        dropped = preflight(chars, self.label_check())
        datasets = {split: data.make_dataset(
            {i: r for i, r in split_rows.items() if i not in dropped[split]},
            sort_by_duration=split != "train") for split, split_rows in rows.items()}
        self.add_pipelines(list(datasets.values()))
        hparams = self.hparams
        brain = self.brain_class(modules=self.modules(), hparams=hparams, run_opts=run_opts,
                                 checkpointer=hparams["checkpointer"])
        brain.split_languages = languages
        self.configure(brain)
        train, valid = datasets.pop("train"), datasets.pop("valid")
        return Setup(brain, train, valid, datasets)

    # ------------------------------------------------------------------ setup steps
    @abstractmethod
    def build_model(self, train_texts):
        """Step 1: build the model the yaml's ``model`` key names (``train_texts``: the raw
        training transcripts, which a tiny preset's tokenizer may be trained on)."""

    @abstractmethod
    def set_texts(self, rows, languages):
        """Step 2: set ``row["words"]`` (scoring reference) and ``row["target"]``."""

    @abstractmethod
    def build_tokenizer(self, train_rows):
        """Step 3: the tokenizer; returns the characters it covers (None: all)."""

    @abstractmethod
    def label_check(self):
        """Step 4: ``check(split, row, text) -> Problem or None`` for the pre-flight checks."""

    @abstractmethod
    def add_pipelines(self, datasets):
        """Step 5: the datasets' dynamic items and output keys."""

    @abstractmethod
    def modules(self):
        """Step 6: ``{name: module}`` of the Brain; each is checkpointed under its name."""

    @abstractmethod
    def configure(self, brain):
        """Step 7: give the Brain what it decodes and scores with."""

    # ------------------------------------------------------------------ what a run records
    @abstractmethod
    def inference_settings(self):
        """run.json's family part: what an export needs besides the weights."""

    @abstractmethod
    def save_model_files(self, folder):
        """The model's HF config, feature extractor and tokenizer files (no weights)."""

    # ------------------------------------------------------------------ export and tools
    @classmethod
    @abstractmethod
    def export(cls, save, ckpts, info, out):
        """Write a run's checkpoint(s) ``ckpts`` to ``out`` (transformers and SpeechBrain
        files); ``info`` is the run's run.json. Returns the transformers model class name, or
        None where transformers has no class for the model."""

    @classmethod
    def after_load(cls, asr):
        """Adjust a SpeechBrain inference object loaded from an export (default: nothing)."""
        return asr

    def window_seconds(self):
        """The longest audio the built model decodes in one pass, in seconds (None: any)."""
        return None

    @classmethod
    def check_language(cls, language):
        """Refuse (ValueError) a language the family's models cannot be told to write; the text
        normaliser is checked apart (default: any language)."""
        return None

    def setup_summary(self):
        """One line on what ``setup`` built for the data (``tools/new_recipe.py`` prints it)."""
        return f"{self.name} family, set up"

    @classmethod
    @abstractmethod
    def build_random_model(cls, folder, config, texts):
        """A random-init model of HF ``config`` (``{"model_type": ...}`` + config keys) in
        ``folder``, HF format (``tools/benchmark.py``'s real-size models)."""
