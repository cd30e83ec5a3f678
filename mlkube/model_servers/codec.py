"""Requests <-> model input and output, through the model's MLflow signature.

A codec turns one request (v1 JSON body or v2 InferRequest) into a `Rows` value the
batcher can concatenate with others, and turns the model's output for those rows back into
a response. Inputs take the dtypes of the signature, never the request's: a float64 model
gets float64 columns even when a v2 client says FP32, so v1 and v2 predict the same.
Every problem with the input raises kserve's InvalidInput (a 400) with a message that
names the column, row or tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

NUMERIC = {"integer": np.int32, "long": np.int64, "float": np.float32, "double": np.float64}
INTEGRAL = {"integer", "long"}
# MLflow DataType name -> Open Inference Protocol datatype, for /v2/models/{name} metadata
V2_DATATYPES = {
    "integer": "INT32",
    "long": "INT64",
    "float": "FP32",
    "double": "FP64",
    "boolean": "BOOL",
}
SAMPLE_SEED = 20261201  # rows made from a signature are the same on every load


@dataclass(frozen=True)
class Column:
    name: str
    kind: str  # an MLflow DataType name: double, long, string, boolean, ...
    required: bool = True


@dataclass
class Rows:
    """One request's input: named columns (tabular) or one array (tensor)."""

    data: dict[str, np.ndarray] | np.ndarray | pd.DataFrame
    n: int


# -- limits --------------------------------------------------------------------------------
NAMED_IN_ERRORS = 5  # an error names this many keys and counts the rest (bodies stay small)


def some(names: Sequence[Any], limit: int = NAMED_IN_ERRORS) -> str:
    """Names for an error message, e.g. "a, b, c, d, e and 99995 more": one short line."""
    shown = ", ".join(str(name)[:40] for name in names[:limit])
    more = len(names) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def _element_count(data: Any) -> int:
    if isinstance(data, np.ndarray):
        return int(data.size)
    if isinstance(data, list | tuple):
        nested = [item for item in data if isinstance(item, list | tuple)]
        return len(data) - len(nested) + sum(_element_count(item) for item in nested)
    return 1


def check_v2_shapes(request: InferRequest) -> int:
    """Each input's data must fill its declared shape; returns the rows (largest first dim)."""
    rows = 0
    for inp in request.inputs:
        shape = [int(d) for d in inp.shape]
        if not shape or any(d < 0 for d in shape):
            raise InvalidInput(f"input {inp.name!r}: shape {shape} must list non-negative sizes")
        needed = math.prod(shape)
        given = _element_count(_request_data(inp))
        if given != needed:
            raise InvalidInput(
                f"input {inp.name!r}: shape {shape} needs {needed} values, got {given}"
            )
        rows = max(rows, shape[0])
    return rows


def v1_rows(body: Any) -> int:
    """Rows a v1 body asks for, counted before any conversion."""
    data = v1_payload(body)
    if isinstance(data, list):
        return len(data)
    if isinstance(data, dict):
        lengths = [len(v) for v in data.values() if isinstance(v, list)]
        return max(lengths, default=1)
    return 1


def check_rows(rows: int, limit: int | None) -> None:
    """Refuse a request over the row cap before it costs a conversion."""
    if limit is not None and rows > limit:
        raise InvalidInput(
            f"request has {rows} rows, over this server's limit of {limit} "
            "(max_request_rows; split the request)"
        )


# -- values --------------------------------------------------------------------------------
def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def convert_column(column: Column, values: Sequence[Any] | np.ndarray) -> np.ndarray:
    """Values of one column as the signature's numpy dtype, or InvalidInput naming the cell."""
    kind, name = column.kind, column.name
    if isinstance(values, np.ndarray) and kind in NUMERIC and values.dtype.kind in "biuf":
        return values.reshape(-1).astype(NUMERIC[kind], copy=False)
    if isinstance(values, np.ndarray):
        values = values.reshape(-1).tolist()
    elif kind in NUMERIC:
        numbers_only = _numbers(values, kind)
        if numbers_only is not None:
            return numbers_only
    for row, value in enumerate(values):
        if value is None:
            if column.required:
                raise InvalidInput(f"column {name!r}: missing value in row {row}")
            continue
        if kind in NUMERIC:
            if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
                raise InvalidInput(
                    f"column {name!r}: expected {kind} (a number), got {_describe(value)} "
                    f"in row {row}"
                )
            if kind in INTEGRAL and not float(value).is_integer():
                raise InvalidInput(
                    f"column {name!r}: expected {kind} (a whole number), got {value!r} in row {row}"
                )
        elif kind == "string":
            if isinstance(value, bytes):
                continue
            if not isinstance(value, str):
                raise InvalidInput(
                    f"column {name!r}: expected string, got {_describe(value)} in row {row}"
                )
        elif kind == "boolean" and not isinstance(value, bool | np.bool_):
            raise InvalidInput(
                f"column {name!r}: expected boolean, got {_describe(value)} in row {row}"
            )
    if kind in NUMERIC:
        if any(v is None for v in values):
            return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)
        return np.asarray(values, dtype=NUMERIC[kind])
    if kind == "string":
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    if kind == "boolean":
        return np.asarray(values, dtype=bool)
    if kind == "datetime":
        try:
            return np.asarray(pd.to_datetime(list(values)))
        except (ValueError, TypeError) as error:
            raise InvalidInput(f"column {name!r}: not a datetime: {error}") from None
    return np.asarray(values, dtype=object)


def _numbers(values: Sequence[Any], kind: str) -> np.ndarray | None:
    """The common case of convert_column checked by numpy in one pass: plain numbers (no
    None, booleans, strings or nested lists), whole where the kind is integral. None when
    anything else is in there; the caller's per-value loop then names the culprit."""
    if any(isinstance(value, bool | np.bool_) for value in values):
        return None  # numpy would take True for 1
    try:
        array = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        return None
    if array.ndim != 1 or array.dtype.kind not in "iuf":
        return None  # booleans, None, strings, Python ints beyond int64 or ragged rows
    if kind in INTEGRAL and array.dtype.kind == "f" and not _whole(array):
        return None
    dtype = NUMERIC[kind]
    # the same conversion as the loop's path (np.asarray of the values in the signature's dtype)
    return array if array.dtype == dtype else np.asarray(values, dtype=dtype)


def _whole(array: np.ndarray) -> bool:
    return bool(np.isfinite(array).all() and (array == np.trunc(array)).all())


def _flat(values: Any) -> list[Any]:
    """[[1], [2]] (shape [n, 1]) or [1, 2] -> [1, 2]."""
    if values and all(isinstance(v, list) and len(v) == 1 for v in values):
        return [v[0] for v in values]
    return list(values)


def _request_data(inp: InferInput) -> Any:
    """The raw JSON/gRPC values, not kserve's as_numpy() (which casts to the request dtype)."""
    if getattr(inp, "_raw_data", None) is not None:
        return inp.as_numpy()
    return inp.data


def v1_payload(body: Any) -> Any:
    """The `instances` or `inputs` of a v1 request body."""
    if not isinstance(body, dict):
        raise InvalidInput('expected a JSON object with "instances" or "inputs"')
    if "instances" in body and "inputs" in body:
        raise InvalidInput('give "instances" or "inputs", not both')
    if "instances" in body:
        return body["instances"]
    if "inputs" in body:
        return body["inputs"]
    raise InvalidInput(f'expected "instances" or "inputs", got keys: {some(list(body)) or "none"}')


# -- outputs -------------------------------------------------------------------------------
def normalize_output(output: Any) -> np.ndarray | pd.DataFrame:
    if isinstance(output, pd.DataFrame):
        return output
    if isinstance(output, pd.Series):
        return output.to_numpy()
    if hasattr(output, "detach"):  # a torch tensor from a custom pyfunc
        array: np.ndarray = output.detach().cpu().numpy()
        return array
    if isinstance(output, dict):
        return pd.DataFrame({k: list(np.asarray(v)) for k, v in output.items()})
    return np.asarray(output)


def split_output(output: Any, sizes: list[int]) -> list[np.ndarray | pd.DataFrame]:
    """The model's output for a concatenated batch, cut back into one part per request."""
    out = normalize_output(output)
    total = sum(sizes)
    if len(out) != total:
        raise ValueError(f"model returned {len(out)} rows for {total} inputs")
    parts, start = [], 0
    for size in sizes:
        part = (
            out.iloc[start : start + size]
            if isinstance(out, pd.DataFrame)
            else out[start : start + size]
        )
        parts.append(part)
        start += size
    return parts


def to_json(output: np.ndarray | pd.DataFrame) -> Any:
    if isinstance(output, pd.DataFrame):
        return output.to_dict(orient="records")
    if output.dtype.kind == "O":
        return [v.decode() if isinstance(v, bytes) else v for v in output.tolist()]
    return output.tolist()


def _infer_output(name: str, array: np.ndarray) -> InferOutput:
    if array.dtype.kind in "OUS":
        data = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        return InferOutput(name=name, shape=list(array.shape), datatype="BYTES", data=data)
    from kserve.utils.numpy_codec import from_np_dtype

    return InferOutput(
        name=name,
        shape=list(array.shape),
        datatype=from_np_dtype(array.dtype),
        data=array.reshape(-1).tolist(),
    )


def to_infer_response(
    output: np.ndarray | pd.DataFrame,
    model_name: str,
    request_id: str,
    output_name: str,
    request: InferRequest | None = None,
) -> InferResponse:
    """The v2 response; in binary form where `request` asks for it (REST's
    `binary_data_output` and per-output `binary_data`; over gRPC, raw inputs get raw
    outputs, which Triton's clients read), with only the outputs it names, if it names any."""
    if isinstance(output, pd.DataFrame):
        outputs = [_infer_output(str(col), output[col].to_numpy()) for col in output.columns]
    else:
        outputs = [_infer_output(output_name, output)]
    return InferResponse(
        response_id=request_id,
        model_name=model_name,
        infer_outputs=outputs,
        use_binary_outputs=bool(request.use_binary_outputs) if request else False,
        requested_outputs=(request.request_outputs or None) if request else None,
    )


# -- codecs --------------------------------------------------------------------------------
class Codec:
    """Base: how requests become model input. `batchable` says rows may be concatenated."""

    batchable = True
    output_name = "predict"

    def decode_v1(self, body: Any) -> Rows:
        raise NotImplementedError

    def decode_v2(self, request: InferRequest) -> Rows:
        raise NotImplementedError

    def concat(self, parts: list[Rows]) -> Any:
        raise NotImplementedError

    def batch_key(self, rows: Rows) -> tuple[str, ...]:
        """Requests with equal keys may share one predict call."""
        return ()

    def describe(self) -> list[dict[str, Any]]:
        """Input metadata for /v2/models/{name}."""
        return []

    def sample_rows(self, count: int) -> list[Rows]:
        """One-row inputs made from the signature alone (for models logged without an input
        example), or none where the signature does not say which values are valid."""
        return []


def _row_count(lengths: dict[str, int], what: str) -> int:
    """The number of rows in equally long columns; refuses ragged or empty ones."""
    if len(set(lengths.values())) != 1:
        pairs = [f"{name}={length}" for name, length in lengths.items()]
        raise InvalidInput(f"{what} have different lengths: {some(pairs)}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise InvalidInput("no rows given")
    return n


class TabularCodec(Codec):
    """Named columns (a ColSpec signature): v1 records, rows or columns; v2 one input a column."""

    def __init__(self, columns: list[Column]) -> None:
        self.columns = columns
        self.names = [c.name for c in columns]
        self._by_name = {c.name: c for c in columns}
        self._known = frozenset(self.names)
        self._required = frozenset(c.name for c in columns if c.required)

    def decode_v1(self, body: Any) -> Rows:
        data = v1_payload(body)
        if isinstance(data, dict):
            if data and all(isinstance(v, list) for v in data.values()):
                return self._from_columns(data)  # {"age": [..], "bmi": [..]}
            data = [data]  # one record
        if not isinstance(data, list) or not data:
            raise InvalidInput("expected a non-empty list of rows or records")
        if all(isinstance(r, dict) for r in data):
            return self._from_records(data)
        if all(isinstance(r, list) for r in data):
            return self._from_rows(data)
        raise InvalidInput("expected rows (lists) or records (objects), not a mix or scalars")

    def _check_names(self, given: Sequence[str], where: str = "", hint: str = "") -> None:
        names = set(given)
        if self._required <= names and names <= self._known:
            return
        required = self._required
        missing = [n for n in self.names if n in required and n not in given]
        extra = [n for n in given if n not in self._by_name]
        if missing:
            raise InvalidInput(f"missing column(s){where}: {some(missing)}{hint}")
        if extra:
            raise InvalidInput(
                f"unknown column(s){where}: {some(extra)}; expected {some(self.names)}{hint}"
            )

    def _from_records(self, records: list[dict[str, Any]]) -> Rows:
        for i, record in enumerate(records):
            self._check_names(list(record), f" in record {i}" if len(records) > 1 else "")
        cols = {
            c.name: convert_column(c, [r.get(c.name) for r in records])
            for c in self.columns
            if c.required or any(c.name in r for r in records)
        }
        return Rows(cols, len(records))

    def _from_rows(self, rows: list[list[Any]]) -> Rows:
        width = len(self.names)
        for i, row in enumerate(rows):
            if len(row) != width:
                raise InvalidInput(
                    f"row {i} has {len(row)} values, expected {width} ({', '.join(self.names)})"
                )
        cols = {c.name: convert_column(c, [r[j] for r in rows]) for j, c in enumerate(self.columns)}
        return Rows(cols, len(rows))

    def _from_columns(self, data: dict[str, list[Any]]) -> Rows:
        self._check_names(list(data))
        n = _row_count({name: len(values) for name, values in data.items()}, "columns")
        cols = {name: convert_column(self._by_name[name], values) for name, values in data.items()}
        return Rows(cols, n)

    def decode_v2(self, request: InferRequest) -> Rows:
        inputs = request.inputs
        if not inputs:
            raise InvalidInput("no inputs given")
        self._check_names([i.name for i in inputs], hint=" (v2: one input per column)")
        cols: dict[str, Any] = {}
        for inp in inputs:
            values = _request_data(inp)
            if isinstance(values, list):
                values = _flat(values)
            cols[inp.name] = convert_column(self._by_name[inp.name], values)
        return Rows(cols, _row_count({name: len(v) for name, v in cols.items()}, "inputs"))

    def concat(self, parts: list[Rows]) -> pd.DataFrame:
        # This codec's rows are always named columns.
        columns = [cast(dict[str, np.ndarray], p.data) for p in parts]
        if len(columns) == 1:
            return pd.DataFrame(columns[0])
        first = columns[0]
        return pd.DataFrame({name: np.concatenate([c[name] for c in columns]) for name in first})

    def batch_key(self, rows: Rows) -> tuple[str, ...]:
        return tuple(rows.data)

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": c.name, "datatype": V2_DATATYPES.get(c.kind, "BYTES"), "shape": [-1]}
            for c in self.columns
        ]

    def sample_rows(self, count: int) -> list[Rows]:
        """Numbers and booleans only: a string column's valid values (categories) are unknown,
        and a model may refuse any other."""
        required = [c for c in self.columns if c.required]
        if not required or any(c.kind not in NUMERIC and c.kind != "boolean" for c in required):
            return []
        rng = np.random.default_rng(SAMPLE_SEED)
        return [
            Rows({c.name: _sample(rng, c.kind, (1,)) for c in required}, 1) for _ in range(count)
        ]


class TensorCodec(Codec):
    """One tensor (a TensorSpec signature, e.g. a torch model): rows along the first axis."""

    def __init__(self, dtype: np.dtype, shape: Sequence[int], name: str | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.shape = tuple(shape)
        self.name = name

    def _array(self, data: Any, what: str) -> np.ndarray:
        if isinstance(data, np.ndarray):
            array = data
        else:
            try:
                array = np.asarray(data)
            except ValueError:
                raise InvalidInput(f"{what}: not a rectangular array") from None
        if array.dtype.kind not in "biuf":
            raise InvalidInput(
                f"{what}: expected numbers ({self.dtype}), got {array.dtype.kind!r} values"
                if array.dtype.kind != "O"
                else f"{what}: not a rectangular array of numbers"
            )
        self._check_shape(array.shape, what)
        return array.astype(self.dtype, copy=False)

    def _check_shape(self, shape: tuple[int, ...], what: str) -> None:
        expected = self.shape
        ok = len(shape) == len(expected) and all(
            e == -1 or e == s for e, s in zip(expected[1:], shape[1:], strict=True)
        )
        if not ok or shape[0] == 0:
            want = "(" + ", ".join("N" if e == -1 else str(e) for e in expected) + ")"
            raise InvalidInput(f"{what}: expected shape {want}, got {tuple(shape)}")

    def decode_v1(self, body: Any) -> Rows:
        data = v1_payload(body)
        if isinstance(data, dict):
            if self.name is None or set(data) != {self.name}:
                raise InvalidInput(
                    f"expected a list of instances (tensor rows of shape {self.shape[1:]})"
                )
            data = data[self.name]
        array = self._array(data, "instances" if "instances" in body else "inputs")
        return Rows(array, array.shape[0])

    def decode_v2(self, request: InferRequest) -> Rows:
        if len(request.inputs) != 1:
            names = some([i.name for i in request.inputs]) or "none"
            raise InvalidInput(f"expected one input tensor, got {len(request.inputs)} ({names})")
        inp = request.inputs[0]
        try:
            array = np.asarray(_request_data(inp))
        except ValueError:
            raise InvalidInput(f"input {inp.name!r}: not a rectangular array") from None
        needed = int(np.prod(inp.shape))
        if array.size != needed:
            raise InvalidInput(
                f"input {inp.name!r}: shape {list(inp.shape)} needs {needed} values, "
                f"got {array.size}"
            )
        array = array.reshape(inp.shape)
        array = self._array(array, f"input {inp.name!r}")
        return Rows(array, array.shape[0])

    def concat(self, parts: list[Rows]) -> np.ndarray:
        if len(parts) == 1:
            return parts[0].data  # type: ignore[return-value]
        return np.concatenate([p.data for p in parts])

    def describe(self) -> list[dict[str, Any]]:
        from kserve.utils.numpy_codec import from_np_dtype

        return [
            {
                "name": self.name or "input-0",
                "datatype": from_np_dtype(self.dtype),
                "shape": list(self.shape),
            }
        ]

    def sample_rows(self, count: int) -> list[Rows]:
        """Only where every dimension but the first is fixed: others could be any size."""
        if not self.shape or any(size < 0 for size in self.shape[1:]):
            return []
        kind = {"f": "double", "i": "long", "u": "long", "b": "boolean"}.get(self.dtype.kind)
        if kind is None:
            return []
        rng = np.random.default_rng(SAMPLE_SEED)
        shape = (1, *self.shape[1:])
        return [Rows(_sample(rng, kind, shape).astype(self.dtype), 1) for _ in range(count)]


class SchemalessCodec(Codec):
    """No signature: records become a DataFrame, rows an array; each request predicted alone."""

    batchable = False

    def decode_v1(self, body: Any) -> Rows:
        data = v1_payload(body)
        if isinstance(data, dict):
            data = [data]
        if not isinstance(data, list) or not data:
            raise InvalidInput("expected a non-empty list of rows or records")
        if all(isinstance(r, dict) for r in data):
            return Rows(pd.DataFrame.from_records(data), len(data))
        try:
            array = np.asarray(data)
        except ValueError:
            raise InvalidInput("instances: not a rectangular array") from None
        return Rows(array, len(array))

    def decode_v2(self, request: InferRequest) -> Rows:
        if len(request.inputs) == 1:
            inp = request.inputs[0]
            array = np.asarray(_request_data(inp)).reshape(inp.shape)
            return Rows(array, array.shape[0])
        cols = {i.name: np.asarray(_flat(_request_data(i))) for i in request.inputs}
        return Rows(pd.DataFrame(cols), len(next(iter(cols.values()))))

    def concat(self, parts: list[Rows]) -> Any:
        if len(parts) != 1:
            raise ValueError("schemaless inputs are not batched")
        return parts[0].data


def _sample(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values of an MLflow kind: small integers (they may be category codes or counts),
    standard normal floats, fair booleans."""
    if kind in INTEGRAL:
        return rng.integers(0, 4, shape).astype(NUMERIC[kind])
    if kind == "boolean":
        return rng.random(shape) < 0.5
    return rng.standard_normal(shape).astype(NUMERIC[kind])


def describe_outputs(schema: Any, output_name: str = Codec.output_name) -> list[dict[str, Any]]:
    """Output metadata for /v2/models/{name}, named as responses name their outputs."""
    from kserve.utils.numpy_codec import from_np_dtype

    if schema is None:
        return []
    specs = list(schema.inputs)
    if schema.is_tensor_spec():
        return [
            {
                "name": spec.name or (output_name if len(specs) == 1 else f"output-{i}"),
                "datatype": from_np_dtype(np.dtype(spec.type)),
                "shape": list(spec.shape),
            }
            for i, spec in enumerate(specs)
        ]
    described = []
    for i, spec in enumerate(specs):
        kind = getattr(spec.type, "name", None)
        name = spec.name or (output_name if len(specs) == 1 else str(i))
        datatype = V2_DATATYPES.get(kind, "BYTES") if isinstance(kind, str) else "BYTES"
        described.append({"name": name, "datatype": datatype, "shape": [-1]})
    return described


def codec_for_schema(schema: Any) -> Codec:
    """The codec for an MLflow input Schema (or None)."""
    if schema is None:
        return SchemalessCodec()
    if schema.is_tensor_spec():
        specs = schema.inputs
        if len(specs) == 1:
            spec = specs[0]
            return TensorCodec(spec.type, spec.shape, spec.name)
        return SchemalessCodec()
    columns = []
    for spec in schema.inputs:
        kind = getattr(spec.type, "name", None)
        if spec.name is None or not isinstance(kind, str):
            return SchemalessCodec()  # unnamed or nested columns (arrays, objects)
        columns.append(Column(spec.name, kind, bool(getattr(spec, "required", True))))
    return TabularCodec(columns)
