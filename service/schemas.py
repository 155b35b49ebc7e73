"""Request and response bodies of the service (pydantic v2); the OpenAPI schema is generated from them.

A row is a raw Criteo row without its label: 13 integer counts and 26 categorical hashes,
exactly what a line of the training logs holds, preprocessed by the service as in training.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints

from recsys.serving import HEX_PATTERN, MAX_DENSE_ABS
from recsys.serving.criteo import DENSE_COLUMNS, NUM_DENSE, NUM_SPARSE, SPARSE_COLUMNS

MAX_ROWS = 4096
MAX_CANDIDATES = 4096
MAX_ID_LENGTH = 256


def _integral(value: Any) -> Any:
    """``10678.0`` -> ``10678``: JSON Schema's ``integer`` includes numbers with a zero fraction, which a client
    generated from the schema may send; anything else goes on to the strict check (no strings, no bools)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


INTEGRAL = BeforeValidator(_integral)
"""With ``strict=True``: an integer as JSON Schema means it, ``3`` or ``3.0``; never ``"3"``, ``true`` or ``3.5``."""

DenseValue = Annotated[
    int,
    # exclusive bounds: 10**18 stays exact for a client reading JSON numbers as doubles, 10**18 - 1 would read 1e18
    Field(
        strict=True,
        gt=-(MAX_DENSE_ABS + 1),
        lt=MAX_DENSE_ABS + 1,
        description="an integer count of at most 18 digits (negative counts as 0)",
    ),
    INTEGRAL,
]
HexValue = Annotated[
    str, StringConstraints(strict=True, pattern=HEX_PATTERN), Field(description="a categorical hash: 1-8 hex digits")
]
DenseName = Literal[DENSE_COLUMNS]  # type: ignore[valid-type]
SparseName = Literal[SPARSE_COLUMNS]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Row(_Strict):
    """One raw Criteo row (no label). ``null`` is a missing value, as an empty field in the logs."""

    dense: list[DenseValue | None] = Field(
        min_length=NUM_DENSE, max_length=NUM_DENSE, description="I1..I13: 13 integer counts or null"
    )
    sparse: list[HexValue | None] = Field(
        min_length=NUM_SPARSE, max_length=NUM_SPARSE, description="C1..C26: 26 hex strings (1-8 digits) or null"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"dense": [1, 5, None, 0, 1382, 4, 15, 2, 181, 1, 2, None, 2],
                                         "sparse": ["68fd1e64", "80e26c9b", "fb936136", "7b4723c4", "25c83c98",
                                                    "7e0ccccf", "de7995b8", "1f89b562", "a73ee510", "a8cd5504",
                                                    "b2cb9c98", "37c9c164", "2824a5f6", "1adce6ef", "8ba8b39a",
                                                    "891b62e7", "e5ba7672", "f54016b9", "21ddcdc9", "b1252a9d",
                                                    "07b5194c", None, "3a171ecb", "c5c50484", "e8b83407",
                                                    "9727dd16"]}]},
    )  # fmt: skip


class ScoreRequest(_Strict):
    rows: list[Row] = Field(min_length=1, max_length=MAX_ROWS, description=f"1 to {MAX_ROWS} rows to score")


class ScoreResponse(BaseModel):
    scores: list[float] = Field(description="click probability of each row, in request order")
    model: str = Field(description="version of the model that scored them")


class Candidate(_Strict):
    """An item to rank: its id and the columns where it differs from the context row."""

    id: str = Field(min_length=1, max_length=MAX_ID_LENGTH, description="the caller's id of the item")
    sparse: dict[SparseName, HexValue | None] = Field(
        default_factory=dict, description="categorical columns of the item (C1..C26) replacing the context's"
    )
    dense: dict[DenseName, DenseValue | None] = Field(
        default_factory=dict, description="integer columns of the item (I1..I13) replacing the context's"
    )


class RankRequest(_Strict):
    context: Row = Field(description="the user / context row; each candidate overrides some of its columns")
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    top_k: int | None = Field(
        default=None, ge=1, le=MAX_CANDIDATES, description="return only the best k (default: all, sorted)"
    )


class RankedItem(BaseModel):
    id: str
    score: float = Field(description="click probability")
    index: int = Field(description="position of the candidate in the request")


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="candidates by decreasing score (ties: request order)")
    model: str


MAX_HISTORY = 1000
MAX_ITEM_ID = 2**32 - 1  # an item id must fit a categorical value of at most 8 hex digits


class RecommendRequest(_Strict):
    """A user: their recent items and their context row; the answer is items the DLRM scores best."""

    context: Row = Field(description="the user / context row; each recommended item is scored in its re-rank column")
    history: list[Annotated[int, Field(strict=True, ge=0, le=MAX_ITEM_ID), INTEGRAL]] = Field(
        default_factory=list,
        max_length=MAX_HISTORY,
        description="the user's recent item ids, oldest first; the model reads the most recent ones of its catalogue "
        "(others are left out and counted in ignored_history)",
    )
    top_k: int = Field(
        default=10, ge=1, le=1000, description="items to return (at most `candidates`: all of them when larger)"
    )
    candidates: int = Field(
        default=100, ge=1, le=MAX_CANDIDATES, description="items retrieved from the LSH tables and re-ranked"
    )


class RecommendedItem(BaseModel):
    id: int = Field(description="item id of the catalogue")
    score: float = Field(description="click probability by the DLRM (the order of the answer)")
    retrieval_score: float = Field(description="inner product of the user's hidden vector and the item's weight")
    retrieval_rank: int = Field(description="position among the retrieved candidates (0 = best retrieval score)")


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(description="items by decreasing DLRM score (ties: retrieval order)")
    retrieved: int = Field(description="candidates the LSH tables gave (at most `candidates`)")
    ignored_history: int = Field(
        0, description="history items left out because the model's catalogue does not hold them (newer items)"
    )
    model: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: a sentence that names the field and the problem, plus details when there are several."""

    message: str
    detail: list[dict] | None = None


class ReloadResponse(BaseModel):
    reloaded: bool = Field(description="whether a different export was loaded")
    model: str = Field(description="the version served now")
    previous: str | None = Field(default=None, description="the version served before")


class HealthResponse(BaseModel):
    status: str
    model: str | None = None
