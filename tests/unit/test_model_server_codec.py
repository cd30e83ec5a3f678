"""Requests -> model input through the signature, and outputs back; batching keeps predictions."""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Any

import numpy as np
import pandas as pd
import pytest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferRequest

from mlkube.model_servers.batching import MicroBatcher, is_batch_invariant
from mlkube.model_servers.codec import (
    Column,
    TabularCodec,
    TensorCodec,
    convert_column,
    split_output,
    to_infer_response,
    to_json,
)

TABULAR = TabularCodec([Column("age", "long"), Column("bmi", "double"), Column("smoker", "string")])
RECORD = {"age": 30, "bmi": 25.123456789, "smoker": "no"}


def v2(*inputs: tuple[str, list[int], str, list[Any]]) -> InferRequest:
    return InferRequest(
        model_name="m",
        infer_inputs=[InferInput(n, shape, dtype, data) for n, shape, dtype, data in inputs],
    )


def test_records_rows_and_columns_give_the_same_frame() -> None:
    frames = [
        TABULAR.concat([TABULAR.decode_v1(body)])
        for body in (
            {"instances": [RECORD]},
            {"instances": [[30, 25.123456789, "no"]]},
            {"inputs": {"age": [30], "bmi": [25.123456789], "smoker": ["no"]}},
            {"inputs": RECORD},
        )
    ]
    for frame in frames:
        pd.testing.assert_frame_equal(frame, frames[0])
    assert frames[0].dtypes.to_dict() == {
        "age": np.dtype("int64"),
        "bmi": np.dtype("float64"),
        "smoker": np.dtype("O"),
    }


def test_v2_takes_the_signature_dtype_not_the_request_dtype() -> None:
    request = v2(
        ("age", [1], "FP32", [30]),
        ("bmi", [1, 1], "FP32", [[25.123456789]]),
        ("smoker", [1], "BYTES", ["no"]),
    )
    frame = TABULAR.concat([TABULAR.decode_v2(request)])
    assert frame["bmi"].dtype == np.float64
    assert frame["bmi"].iloc[0] == 25.123456789  # not rounded through float32


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instances": [{"age": 30, "bmi": 25.0}]}, "missing column(s): smoker"),
        ({"instances": [{**RECORD, "x": 1}]}, "unknown column(s): x"),
        ({"instances": [{**RECORD, "bmi": "high"}]}, "column 'bmi': expected double"),
        ({"instances": [{**RECORD, "age": 30.5}]}, "column 'age': expected long (a whole number)"),
        ({"instances": [{**RECORD, "smoker": 1}]}, "column 'smoker': expected string"),
        ({"instances": [{**RECORD, "age": None}]}, "column 'age': missing value in row 0"),
        ({"instances": [[30, 25.0]]}, "row 0 has 2 values, expected 3"),
        ({"instances": [RECORD, [30, 25.0, "no"]]}, "not a mix"),
        ({"instances": []}, "non-empty"),
        ({"inputs": {"age": [1, 2], "bmi": [1.0], "smoker": ["a"]}}, "different lengths"),
        ({"data": []}, 'expected "instances" or "inputs"'),
        ("text", "expected a JSON object"),
    ],
)
def test_tabular_errors_name_the_problem(body: Any, message: str) -> None:
    with pytest.raises(InvalidInput) as raised:
        TABULAR.decode_v1(body)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("kind", "values", "message"),
    [
        ("long", [1, True], "expected long (a number), got True in row 1"),
        ("double", [np.True_, 2.5], "expected double (a number), got np.True_ in row 0"),
        ("long", [1, 2.5], "expected long (a whole number), got 2.5 in row 1"),
        ("long", [1.0, float("nan")], "expected long (a whole number), got nan in row 1"),
        ("double", [1.0, None], "missing value in row 1"),
        ("double", [1.0, "2"], "expected double (a number), got '2' in row 1"),
        ("long", [1, [2]], "expected long (a number), got [2] in row 1"),
    ],
)
def test_numbers_are_checked_value_by_value_where_numpy_would_coerce(
    kind: str, values: list[Any], message: str
) -> None:
    with pytest.raises(InvalidInput) as raised:
        convert_column(Column("x", kind), values)
    assert message in str(raised.value)


def test_plain_numbers_take_the_signature_dtype() -> None:
    assert convert_column(Column("x", "long"), [1.0, 2.0]).tolist() == [1, 2]
    assert convert_column(Column("x", "long"), [1.0, 2.0]).dtype == np.int64
    assert convert_column(Column("x", "integer"), [3, 4]).dtype == np.int32
    assert convert_column(Column("x", "double"), [1, 2.5]).tolist() == [1.0, 2.5]
    assert convert_column(Column("x", "float"), [0.1]).dtype == np.float32
    big = convert_column(Column("x", "double"), [2**70])  # beyond int64: the per-value path
    assert big.tolist() == [float(2**70)]


def test_binary_outputs_where_the_request_asks_for_them() -> None:
    output = np.array([1.5, 2.5])
    plain = to_infer_response(output, "m", "id", "predict", v2(("x", [1], "FP64", [1.0])))
    assert plain.to_rest()[0]["outputs"][0]["data"] == [1.5, 2.5]
    asked = v2(("x", [1], "FP64", [1.0]))
    asked.parameters = {"binary_data_output": True}
    body, json_length = to_infer_response(output, "m", "id", "predict", asked).to_rest()
    assert isinstance(body, bytes) and json_length is not None
    assert np.frombuffer(body[json_length:], "<f8").tolist() == [1.5, 2.5]


def test_tensor_codec_checks_shape_and_casts_to_the_signature() -> None:
    codec = TensorCodec(np.dtype("float32"), (-1, 4))
    rows = codec.decode_v1({"instances": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    assert rows.n == 2 and rows.data.dtype == np.float32
    request = v2(("x", [2, 4], "FP64", list(range(8))))
    assert codec.decode_v2(request).data.shape == (2, 4)
    for body, message in (
        ({"instances": [[1, 2, 3]]}, "expected shape (N, 4), got (1, 3)"),
        ({"instances": [[1, 2, 3, 4], [1, 2]]}, "not a rectangular array"),
        ({"instances": [["a", "b", "c", "d"]]}, "expected numbers"),
    ):
        with pytest.raises(InvalidInput) as raised:
            codec.decode_v1(body)
        assert message in str(raised.value)
    with pytest.raises(InvalidInput, match="needs 8 values, got 6"):
        codec.decode_v2(v2(("x", [2, 4], "FP32", list(range(6)))))
    with pytest.raises(InvalidInput, match="expected one input tensor"):
        codec.decode_v2(v2(("x", [1, 4], "FP32", [1, 2, 3, 4]), ("y", [1], "FP32", [1])))


def test_outputs_split_per_request_and_encode() -> None:
    parts = split_output(np.array([1.0, 2.0, 3.0]), [1, 2])
    assert [to_json(p) for p in parts] == [[1.0], [2.0, 3.0]]
    with pytest.raises(ValueError, match="returned 2 rows for 3 inputs"):
        split_output(np.array([1.0, 2.0]), [1, 2])
    response = to_infer_response(np.array([[1.0, 2.0]]), "m", "id-1", "predict")
    assert response.outputs[0].datatype == "FP64" and response.outputs[0].shape == [1, 2]


def test_batched_predictions_equal_one_by_one_predictions() -> None:
    rng = np.random.default_rng(0)
    weights = rng.random(3)
    calls: list[int] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        calls.append(len(frame))
        if (frame["smoker"] == "boom").any():
            raise ValueError("bad row")
        # Elementwise, so each row's value cannot depend on the batch (a matrix product's
        # last bit does, with BLAS kernels that block by batch size: seen on AVX-512).
        age, bmi = frame["age"].to_numpy(), frame["bmi"].to_numpy()
        return age * weights[0] + bmi * weights[1] + (frame["smoker"] == "yes").to_numpy()

    records = [
        {"age": int(a), "bmi": float(b), "smoker": s}
        for a, b, s in zip(
            rng.integers(18, 65, 40), rng.random(40) * 40, ["yes", "no"] * 20, strict=True
        )
    ]
    records[7]["smoker"] = "boom"
    alone = [
        predict(TABULAR.concat([TABULAR.decode_v1({"instances": [r]})])) if i != 7 else None
        for i, r in enumerate(records)
    ]
    calls.clear()

    async def main() -> list[Any]:
        batcher = MicroBatcher(predict, TABULAR, max_rows=16, inline_below=60.0)
        await batcher.submit(TABULAR.decode_v1({"instances": [records[0]]}))  # times predict
        jobs = [batcher.submit(TABULAR.decode_v1({"instances": [r]})) for r in records]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(main())
    assert isinstance(results[7], ValueError)  # only the bad request fails
    for i, result in enumerate(results):
        if i != 7:
            assert to_json(result) == alone[i].tolist()
    assert max(calls) > 1  # requests were merged
    assert max(calls) <= 16


def test_models_whose_output_depends_on_the_batch_are_not_batched() -> None:
    rows = [TABULAR.decode_v1({"instances": [RECORD]}) for _ in range(16)]

    def invariant(frame: pd.DataFrame) -> np.ndarray:
        return frame["bmi"].to_numpy() * 2

    def one_row_path(frame: pd.DataFrame) -> np.ndarray:  # like BLAS: 1 row takes another path
        return frame["bmi"].to_numpy() * 2 + (1e-12 if len(frame) == 1 else 0.0)

    assert is_batch_invariant(invariant, TABULAR, rows)
    assert not is_batch_invariant(one_row_path, TABULAR, rows)
    assert not is_batch_invariant(invariant, TABULAR, [])


def _predicting_threads(alone: bool) -> tuple[list[int], int]:
    """(the thread of each of three predicts, the event loop's thread) for three requests in
    turn to a fast model."""
    threads: list[int] = []

    def predict(frame: pd.DataFrame) -> np.ndarray:
        threads.append(threading.get_ident())
        return frame["bmi"].to_numpy()

    async def main() -> int:
        batcher = MicroBatcher(predict, TABULAR, inline_below=60.0)
        for _ in range(3):  # the first call is timed in a worker thread
            await batcher.submit(TABULAR.decode_v1({"instances": [RECORD]}), alone=alone)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    return threads, loop_thread


def test_a_lone_request_to_a_fast_model_runs_on_the_loop_thread() -> None:
    threads, loop_thread = _predicting_threads(alone=True)
    assert threads[0] != loop_thread
    assert threads[1:] == [loop_thread, loop_thread]


def test_a_request_with_others_in_flight_is_never_predicted_on_the_loop() -> None:
    threads, loop_thread = _predicting_threads(alone=False)
    assert loop_thread not in threads and len(threads) == 3


# -- hardening: error sizes, v2 shapes, row caps --------------------------------------------
def test_an_error_about_many_unknown_keys_names_a_few_and_counts_the_rest() -> None:
    record = {**RECORD, **{f"junk{i}": 1 for i in range(100_000)}}
    with pytest.raises(InvalidInput) as caught:
        TABULAR.decode_v1({"instances": [record]})
    message = str(caught.value)
    assert "unknown column(s): junk0, junk1, junk2, junk3, junk4 and 99995 more" in message
    assert len(message) < 300
    with pytest.raises(InvalidInput) as caught:
        TABULAR.decode_v1({f"k{i}": 1 for i in range(100_000)})
    assert "and 99995 more" in str(caught.value) and len(str(caught.value)) < 300


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (v2(("age", [5], "INT64", [1, 2])), "shape [5] needs 5 values, got 2"),
        (v2(("x", [2, 3], "FP64", [1.0, 2.0, 3.0])), "shape [2, 3] needs 6 values, got 3"),
        (v2(("age", [-1], "INT64", [1])), "must list non-negative sizes"),
    ],
)
def test_v2_shapes_are_checked_against_the_data(request_: InferRequest, message: str) -> None:
    from mlkube.model_servers.codec import check_v2_shapes

    with pytest.raises(InvalidInput, match=re.escape(message)):
        check_v2_shapes(request_)
    assert check_v2_shapes(v2(("x", [2, 3], "FP64", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))) == 2


def test_the_row_cap_counts_before_converting() -> None:
    from mlkube.model_servers.codec import check_rows, v1_rows

    assert v1_rows({"instances": [RECORD] * 7}) == 7
    assert v1_rows({"inputs": {"age": [1] * 9, "bmi": [1.0] * 9}}) == 9
    assert v1_rows({"instances": RECORD}) == 1
    check_rows(10, 10)
    with pytest.raises(
        InvalidInput, match="11 rows, over this server's limit of 10 .*max_request_rows"
    ):
        check_rows(11, 10)


def test_internal_urls_and_paths_never_reach_a_client() -> None:
    from mlkube.model_servers.model import public_reason

    text = (
        "Failed to download artifacts from path 'mlflow-artifacts:/1/models/m-abc/artifacts' "
        "via http://10.0.0.7:5000/api/2.0/mlflow-artifacts, cause: No such file "
        "or directory: '/var/lib/mlflow/artifacts/1/models/m-abc/MLmodel' for models:/ins/3; "
        "HTTPConnectionPool(host='10.0.0.8', port=45678): Read timed out"
    )
    public = public_reason(text)
    for secret in ("10.0.0.7", "10.0.0.8", "45678", "mlflow-artifacts:/", "/var/lib", "m-abc"):
        assert secret not in public
    assert "models:/ins/3" in public and "No such file" in public
    assert len(public_reason("x" * 10_000)) <= 300


class ThreadRecordingCodec(TabularCodec):
    """The real tabular codec, noting which thread decoded each request."""

    def __init__(self) -> None:
        super().__init__(TABULAR.columns)
        self.threads: list[int] = []

    def decode_v1(self, body: Any) -> Any:
        self.threads.append(threading.get_ident())
        return super().decode_v1(body)

    def decode_v2(self, request: InferRequest) -> Any:
        self.threads.append(threading.get_ident())
        return super().decode_v2(request)


def test_big_requests_are_decoded_off_the_event_loop_and_small_ones_on_it() -> None:
    import orjson
    from kserve.errors import InvalidInput as Invalid

    from mlkube.model_servers.cache import ModelCache
    from mlkube.model_servers.loader import LoadedModel
    from mlkube.model_servers.model import INLINE_BYTES, INLINE_ROWS, LazyModel

    codec = ThreadRecordingCodec()
    loaded = LoadedModel(None, None, codec, None, None, 0)  # type: ignore[arg-type]
    model = LazyModel("m", "models:/m/1", ModelCache(), None, max_request_rows=10**6)  # type: ignore[arg-type]
    small = orjson.dumps({"instances": [RECORD]})
    big = orjson.dumps({"instances": [RECORD] * (INLINE_BYTES // 40)})
    assert len(big) > INLINE_BYTES
    many = v2(("age", [INLINE_ROWS + 1], "INT64", [1] * (INLINE_ROWS + 1)),
              ("bmi", [INLINE_ROWS + 1], "FP64", [1.0] * (INLINE_ROWS + 1)),
              ("smoker", [INLINE_ROWS + 1], "BYTES", ["no"] * (INLINE_ROWS + 1)))  # fmt: skip

    async def decode_all() -> int:
        for payload in (small, big, many):
            await model._decode(loaded, payload)
        with pytest.raises(Invalid, match="max_request_rows"):
            model.max_request_rows = 5
            await model._decode(loaded, big)
        return threading.get_ident()

    loop_thread = asyncio.run(decode_all())
    assert codec.threads[0] == loop_thread
    assert codec.threads[1] != loop_thread and codec.threads[2] != loop_thread
    assert len(codec.threads) == 3  # over the row cap: refused before decoding
