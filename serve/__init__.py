"""The HTTP service and browse page: ``create_app(store_path)`` builds the FastAPI app.

>>> from bemerc.serve import create_app
>>> app = create_app("store")   # doctest: +SKIP
"""

from bemerc.serve.api import create_app

__all__ = ["create_app"]
