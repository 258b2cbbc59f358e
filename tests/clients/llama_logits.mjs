// Logits of GGUF files computed by llama.cpp (node-llama-cpp's prebuilt CPU binary), for quantlm's export checks.
//     node llama_logits.mjs JOBS.json
// JOBS.json: a list of {"model": FILE.gguf, "ids": [token ids], "out": FILE}. For each job, OUT gets the logits
// of every position as little-endian float32 [ids.length, n_vocab], and OUT.json {"n_vocab", "n_tokens"}.
// A job that fails writes OUT.error (one line) instead; the exit status is then 1.
import fs from "node:fs";
import {getLlama, LlamaLogLevel} from "node-llama-cpp";

const jobs = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
let failed = 0;
for (const job of jobs) {
    try {
        const model = await llama.loadModel({modelPath: job.model, gpuLayers: 0});
        // an F32 KV cache and no flash attention: llama.cpp computes attention in fp32, as quantlm does
        const context = await model.createContext({
            contextSize: Math.max(64, job.ids.length + 1), batchSize: job.ids.length, threads: 2,
            flashAttention: false, experimentalKvCacheKeyType: "F32", experimentalKvCacheValueType: "F32",
        });
        const sequence = context.getSequence();
        const items = job.ids.map((token) => [token, {generateNext: {logits: true}}]);
        const results = await sequence.controlledEvaluate(items);
        const nVocab = results[0].next.logits.size;  // every token of the vocabulary has a logit
        const logits = new Float32Array(job.ids.length * nVocab);
        results.forEach((result, i) => {
            for (const [token, value] of result.next.logits) logits[i * nVocab + token] = value;
        });
        fs.writeFileSync(job.out, Buffer.from(logits.buffer));
        fs.writeFileSync(job.out + ".json", JSON.stringify({n_vocab: nVocab, n_tokens: job.ids.length}));
        await context.dispose();
        await model.dispose();
        console.log(job.model, "ok");
    } catch (error) {
        failed += 1;
        fs.writeFileSync(job.out + ".error", `${error?.name ?? "Error"}: ${String(error?.message ?? error).split("\n")[0]}\n`);
        console.log(job.model, "FAILED:", String(error?.message ?? error).split("\n")[0]);
    }
}
process.exit(failed ? 1 : 0);
