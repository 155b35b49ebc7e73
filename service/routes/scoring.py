"""``POST /v1/score`` and ``POST /v1/rank``: click probabilities of raw Criteo rows.

Each handler only delegates to a plain function of the same job (``score_rows``, ``rank_candidates``): the
mutation tests (``scripts/mutation.py``, mutmut) mutate undecorated functions only, and the work is what
they must reach.
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from recsys.serving.criteo import DENSE_COLUMNS, SPARSE_COLUMNS
from recsys.serving.features import Overrides
from service.body import parse_body
from service.deps import Scorer, ScorerDep, json_response
from service.errors import ServiceError
from service.schemas import RankedItem, RankRequest, RankResponse, ScoreRequest, ScoreResponse

router = APIRouter(tags=["model"])

_DENSE_INDEX = {name: i for i, name in enumerate(DENSE_COLUMNS)}
_SPARSE_INDEX = {name: i for i, name in enumerate(SPARSE_COLUMNS)}


@router.post("/v1/score", response_model=ScoreResponse)
async def score(request: Request, scorer: ScorerDep) -> Response:
    """Click probability of each raw Criteo row, preprocessed exactly as in training."""
    return await score_rows(await parse_body(request, ScoreRequest), scorer)


async def score_rows(body: ScoreRequest, scorer: Scorer) -> Response:
    """The work of ``POST /v1/score``."""
    scores = await scorer.raw_rows([r.dense for r in body.rows], [r.sparse for r in body.rows])
    return json_response(ScoreResponse.model_construct(scores=scores.tolist(), model=scorer.model.version))


@router.post("/v1/rank", response_model=RankResponse)
async def rank(request: Request, scorer: ScorerDep) -> Response:
    """Candidates sorted by click probability: each candidate is the context row with its own columns."""
    return await rank_candidates(await parse_body(request, RankRequest), scorer)


async def rank_candidates(body: RankRequest, scorer: Scorer) -> Response:
    """The work of ``POST /v1/rank``: encode the candidates as variants of the context row, score, sort."""
    dense, sparse = Overrides(), Overrides()
    for i, candidate in enumerate(body.candidates):  # one flat pass: no per-candidate dicts
        for name, value in candidate.dense.items():
            dense.rows.append(i)
            dense.columns.append(_DENSE_INDEX[name])
            dense.values.append(value)
        for name, value in candidate.sparse.items():
            sparse.rows.append(i)
            sparse.columns.append(_SPARSE_INDEX[name])
            sparse.values.append(value)
    context = body.context
    try:
        encoded = scorer.model.encoder.encode_overrides(
            context.dense, context.sparse, len(body.candidates), dense, sparse
        )
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    scores = await scorer.encoded(*encoded, variants=True)
    order = np.argsort(-scores, kind="stable")[: body.top_k or len(scores)]
    items = [RankedItem.model_construct(id=body.candidates[i].id, score=float(scores[i]), index=int(i)) for i in order]
    return json_response(RankResponse.model_construct(items=items, model=scorer.model.version))
