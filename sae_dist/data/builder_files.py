"""Local files read by a `datasets` builder ('json', 'csv', 'parquet', ... with `data.data_files`): the builder's
options, and a file the builder cannot read as one line naming it (DataUnavailableError, exit status 2).

`check_first_records` reads the first record of every file as a stream, so only the start of each file is parsed
(milliseconds a file): a damaged file, or one of another format (a text file given to 'json'), is named before a
language model loads, whether the run streams its dataset or not. `named_builder_errors` names the file that a
full (non-streamed) load fails on, past its first record, and `named_stream_errors` the file a stream fails on
while the run reads it (a file damaged past its first record).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from sae_dist.config import DataConfig
from sae_dist.data.source import DataUnavailableError


def builder_options(data: DataConfig) -> dict:
    """The keyword arguments of `load_dataset` for `data.dataset`'s builder beyond its files."""
    # A byte that is not UTF-8 reads as U+FFFD rather than stopping the job: a tree of sources (the README's
    # site-packages corpus) holds a file in another encoding here and there.
    return {"sample_by": data.sample_by, "encoding_errors": "replace"} if data.dataset == "text" else {}


class _BuilderErrors(logging.Filter):
    """Held on the handlers of the `datasets` logger while a builder reads local files: the error it logs before
    raising (the only place that names the file it failed on) is kept for the one-line error, not printed."""

    def __init__(self) -> None:
        super().__init__()
        self.files: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        self.files += re.findall(r"(?:file|from) '([^']+)'", record.getMessage())[:1]
        return False

    def named(self, otherwise: str) -> str:
        """The file of the last error logged, else `otherwise`."""
        return self.files[-1] if self.files else otherwise


@contextmanager
def _held_builder_errors() -> Iterator[_BuilderErrors]:
    handlers = logging.getLogger("datasets").handlers
    errors = _BuilderErrors()
    for handler in handlers:
        handler.addFilter(errors)
    try:
        yield errors
    finally:
        for handler in handlers:
            handler.removeFilter(errors)


def _unreadable(file: str, data: DataConfig, cause: BaseException, hint: str | None = None) -> DataUnavailableError:
    text = str(cause).strip()
    reason = text.splitlines()[0] if text else type(cause).__name__
    article = "an" if data.dataset[0] in "aeiou" else "a"
    hint = hint or f"is it {article} {data.dataset} file?"
    return DataUnavailableError(f"data.data_files: {file} cannot be read by the '{data.dataset}' builder "
                                f"({reason}); {hint}")


@contextmanager
def named_builder_errors(data: DataConfig) -> Iterator[None]:
    """A `datasets` builder failing on a file during a full load (a bad CSV row, a damaged line deep in a JSON
    file) is a one-line DataUnavailableError naming the file, the builder and its reason."""
    from datasets.exceptions import DatasetGenerationError

    with _held_builder_errors() as errors:
        try:
            yield
        except DatasetGenerationError as exc:
            cause = exc.__cause__ or exc.__context__ or exc
            raise _unreadable(errors.named(", ".join(data.data_files)), data, cause) from None


def check_first_records(data: DataConfig) -> None:
    """Every file of `data.data_files` yields its first record to the `data.dataset` builder; else one-line
    DataUnavailableError naming the file, the builder and its reason. The 'text' builder reads any file (encoding
    errors replaced) and is not asked: a tree of thousands of sources would cost seconds for nothing."""
    from datasets import load_dataset
    from datasets.data_files import DataFilesList

    if data.dataset == "text":
        return
    files = [str(file) for file in DataFilesList.from_patterns(list(data.data_files))]
    with _held_builder_errors() as errors:
        try:  # 'parquet' and 'arrow' read the files' schemas here
            stream = load_dataset(data.dataset, data_files=files, split=data.split, streaming=True,
                                  **builder_options(data))
        except Exception as exc:  # whatever a builder raises on reading a file is that file's fault
            raise _unreadable(errors.named(", ".join(data.data_files)), data, exc) from None
        shards = stream.num_shards  # one a file, in the order of `files`
        for index in range(shards):
            try:
                next(iter(stream.shard(num_shards=shards, index=index)), None)
            except Exception as exc:  # as above
                file = files[index] if shards == len(files) else ", ".join(data.data_files)
                raise _unreadable(errors.named(file), data, exc) from None


@contextmanager
def named_stream_errors(data: DataConfig) -> Iterator[None]:
    """Reading a stream of `data.data_files` (`data.streaming`): a record the builder cannot parse, in a file damaged
    past the first record that `check_first_records` read, is a one-line DataUnavailableError naming the file, the
    builder and its reason, rather than the builder's traceback. Hold it around each read of the stream only: every
    error inside it is taken for the file's."""
    with _held_builder_errors() as errors:
        try:
            yield
        except DataUnavailableError:
            raise
        except Exception as exc:  # whatever a builder raises on reading a file is that file's fault
            raise _unreadable(errors.named(", ".join(data.data_files)), data, exc,
                              "its records before that were read; repair or remove the file") from None
