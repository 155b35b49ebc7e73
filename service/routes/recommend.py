"""``POST /v1/recommend``: items retrieved by the export's LSH output layer, re-ranked by the DLRM.

The handler delegates to ``recommend_items``, a plain function the mutation tests can reach (mutmut mutates
undecorated functions only).
"""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.body import parse_body
from service.deps import Scorer, ScorerDep, json_response
from service.errors import ServiceError
from service.schemas import ErrorResponse, RecommendedItem, RecommendRequest, RecommendResponse

router = APIRouter(tags=["model"])


@router.post(
    "/v1/recommend",
    response_model=RecommendResponse,
    responses={501: {"model": ErrorResponse, "description": "the model has no retrieval (LSH) layer"}},
)
async def recommend(request: Request, scorer: ScorerDep) -> Response:
    """Items retrieved by the export's LSH output layer from the user's history, re-ranked by the DLRM.

    The history encoder gives the user's hidden vector; ``LSHOutputLayer.topk`` the ``candidates``
    items of its buckets with the best inner product; each is put into the context row's re-rank
    column (the manifest's ``retrieval.rerank``) and scored like a ``/v1/rank`` candidate.
    """
    return await recommend_items(await parse_body(request, RecommendRequest), scorer)


async def recommend_items(body: RecommendRequest, scorer: Scorer) -> Response:
    """The work of ``POST /v1/recommend``."""
    model = scorer.model
    retrieval = model.retrieval
    if retrieval is None:
        raise ServiceError(
            501,
            f"/v1/recommend needs an LSH output layer in the export; model {model.version} was exported "
            "without one (export with `python -m pipelines.export ... --retrieval NEXT_ITEM_RUN --item-column "
            "C?`). Rank your own candidates with POST /v1/rank.",
        )
    known = retrieval.in_catalogue(body.history)  # items newer than the model are left out, not refused
    history = [item for item, k in zip(body.history, known.tolist(), strict=True) if k]
    ignored = len(body.history) - len(history)
    items, retrieval_scores = await scorer.batcher.call(retrieval.retrieve, history, body.candidates)
    if len(items) == 0:
        return json_response(RecommendResponse(items=[], retrieved=0, ignored_history=ignored, model=model.version))
    try:
        encoded = model.encode_items(items, body.context.dense, body.context.sparse)
    except ValueError as exc:
        raise ServiceError(422, str(exc)) from exc
    scores = await scorer.encoded(*encoded, variants=True)
    order = np.argsort(-scores, kind="stable")[: body.top_k]
    answer = [
        RecommendedItem.model_construct(
            id=int(items[i]),
            score=float(scores[i]),
            retrieval_score=float(retrieval_scores[i]),
            retrieval_rank=int(i),
        )
        for i in order
    ]
    return json_response(
        RecommendResponse.model_construct(
            items=answer, retrieved=len(items), ignored_history=ignored, model=model.version
        )
    )
