"""The vLLM engine: Ray Serve LLM's OpenAI app, with the spec's limits and API keys.

Ray Serve LLM checks no API keys. Its ingress class is its extension point
(`LLMServingArgs.ingress_cls_config`), so keys are checked by `keyed_ingress`: a subclass of
its `OpenAiIngress` whose every route answers 401 without a valid key and otherwise hands
the request to the original route. Imported only for `serve.engine: vllm`, which needs
`pip install 'llm-dist[vllm]'` (vLLM, GPUs).
"""

import inspect

from fastapi import Request
from fastapi.responses import JSONResponse
from ray.serve.llm import LLMConfig, build_openai_app
from ray.serve.llm.ingress import OpenAiIngress

from llm_dist.serve.protocol import authorized


def app(spec, folder: str, key_hashes: list[str]):
    """The Serve application for `folder` on vLLM; `key_hashes` (SHA-256) guard it when set."""
    s = spec.serve
    source = {"bucket_uri": folder} if "://" in folder else folder
    config = LLMConfig(
        model_loading_config={"model_id": spec.name, "model_source": source},
        accelerator_type=spec.cluster.accelerator_type,
        engine_kwargs={"max_model_len": s.max_prompt_tokens + s.max_tokens,
                       "max_num_seqs": s.max_batch_size,
                       "tensor_parallel_size": max(1, int(s.gpus_per_replica or 1))},
        deployment_config={"max_ongoing_requests": s.max_ongoing_requests,
                           "max_queued_requests": s.max_queued_requests, **s.scaling()},
    )  # fmt: skip
    args = {"llm_configs": [config]}
    if key_hashes:
        args["ingress_cls_config"] = {"ingress_cls": keyed_ingress(),
                                      "ingress_extra_kwargs": {"key_hashes": key_hashes}}  # fmt: skip
    return build_openai_app(args)


def keyed_ingress() -> type:
    """`OpenAiIngress` with every route it serves refusing a request without a valid key."""
    from llm_dist.compat import serve_llm_routes

    def init(self, *args, key_hashes: list[str], **kwargs):
        OpenAiIngress.__init__(self, *args, **kwargs)
        self.key_hashes = key_hashes

    return type("KeyedIngress", (OpenAiIngress,), {
        "__init__": init, **{name: _keyed(getattr(OpenAiIngress, name)) for name in serve_llm_routes()}
    })  # fmt: skip


def _keyed(route):
    """`route` behind the key check; FastAPI sees its parameters, and a `request` if it had none."""
    signature = inspect.signature(route)
    wanted = "request" in signature.parameters
    parameters = list(signature.parameters.values())
    if not wanted:
        parameters.append(inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY,
                                            annotation=Request))  # fmt: skip

    async def keyed(self, *args, request: Request, **kwargs):
        if not authorized(request.headers.get("authorization", ""), self.key_hashes):
            body = {"message": "a valid API key is required", "type": "authentication_error",
                    "param": None, "code": None}  # fmt: skip
            return JSONResponse({"error": body}, status_code=401)
        return await route(self, *args, **kwargs, **({"request": request} if wanted else {}))

    # Ray's class-based view binds a route to the replica only if its qualified name is a method
    # of a class in the ingress's MRO
    keyed.__name__, keyed.__qualname__, keyed.__doc__ = (
        route.__name__,
        route.__qualname__,
        route.__doc__,
    )
    keyed.__signature__ = signature.replace(parameters=parameters)
    return keyed
