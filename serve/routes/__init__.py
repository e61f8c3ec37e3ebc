"""The routers of the app, one per concern: browse (store, dialogues, the page), runs, predict.

A route reads what the app serves from ``request.app.state`` (set by
:func:`bemerc.serve.api.create_app`), through the dependencies below.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from bemerc.store import Store


async def app_store(request: Request) -> Store:
    """The store the app serves."""
    return request.app.state.store


StoreDep = Annotated[Store, Depends(app_store)]
