"""Multi-model mode: any registered model served by name, `models:/{name}@{alias}` on demand."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

from kserve.model import BaseKServeModel
from kserve.model_repository import ModelRepository

from mlkube.api.registered_model import DEFAULT_ALIAS, MODEL_NAME_PATTERN, model_uri
from mlkube.model_servers.sources import UnknownModel, resolve

_NAME = re.compile(MODEL_NAME_PATTERN)  # MLflow names mlkube accepts


class RegistryModelRepository(ModelRepository):
    """Creates a LazyModel the first time a name is asked for; forgets names MLflow lacks.

    All models share one cache, so the TTL and the LRU memory budget span every model.
    """

    def __init__(
        self,
        factory: Callable[[str], BaseKServeModel],
        alias: str = DEFAULT_ALIAS,
        exists: Callable[[str], object] = resolve,
    ) -> None:
        super().__init__()
        self._factory = factory
        self.alias = alias
        self._exists = exists
        self._known: set[str] = set()

    def uri_for(self, name: str) -> str:
        return model_uri(name, alias=self.alias)

    def get_model(self, name: str) -> BaseKServeModel | None:
        model = self.models.get(name)
        if model is None and _NAME.match(name):
            model = self._factory(name)
            self.update(model)
        return model

    def forget(self, name: str) -> None:
        self.models.pop(name, None)
        self._known.discard(name)

    async def is_model_ready(self, name: str) -> bool:
        """Ready once MLflow knows `name@alias` (checked once per name); unknown names are 404."""
        model = self.get_model(name)
        if model is None:
            return False
        if name not in self._known:
            try:
                await asyncio.to_thread(self._exists, self.uri_for(name))
            except UnknownModel:
                self.forget(name)
                from kserve.errors import ModelNotFound

                missing = ModelNotFound(name)
                missing.reason = f"model {name!r} has no alias {self.alias!r} in the registry"
                raise missing from None
            except Exception:
                return bool(await model.healthy())  # registry trouble: let the load report it (503)
            self._known.add(name)
        return bool(await model.healthy())
