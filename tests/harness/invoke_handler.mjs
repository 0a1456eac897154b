// Drives a Lambda-style handler module for the tests: one process, many invocations.
//
// Usage: node invoke_handler.mjs HANDLER_MODULE REPLY_FD
//
// Requests arrive on stdin and replies leave on the file descriptor REPLY_FD, one JSON
// object per line. A channel of its own keeps whatever the handler logs to stdout out of
// the replies. The module is imported once, as in a warm function instance, so its
// module-scope state lasts across invocations.
//
// Requests (each has a numeric "id" that its replies repeat):
//   {"op": "invoke", "event": ..., "context": {...}, "freezeUntil": PATH?}
//   {"op": "invoke_batch", "invocations": [{"event": ..., "context": {...}}, ...]}
//   {"op": "pool_stats"}
// Closing stdin ends the module's pool, if it exports getPool(), and exits.

import { randomUUID } from "node:crypto";
import { existsSync, writeSync } from "node:fs";
import { resolve } from "node:path";
import { createInterface } from "node:readline";
import { pathToFileURL } from "node:url";

// Lambda's default function timeout is 3 seconds.
const DEFAULT_TIMEOUT_MILLIS = 3000;
const MAX_FREEZE_MILLIS = 60_000;
const FREEZE_POLL_MILLIS = 5;
const POOL_END_TIMEOUT_MILLIS = 2000;

const [modulePath, replyFdText] = process.argv.slice(2);
if (!modulePath || !replyFdText) {
  console.error("usage: node invoke_handler.mjs HANDLER_MODULE REPLY_FD");
  process.exit(2);
}
const replyFd = Number(replyFdText);

function reply(message) {
  const bytes = Buffer.from(`${JSON.stringify(message)}\n`);
  let written = 0;
  while (written < bytes.length) {
    written += writeSync(replyFd, bytes, written);
  }
}

function describeError(error) {
  if (error instanceof Error) {
    return {
      name: error.name,
      message: error.message,
      code: typeof error.code === "string" ? error.code : null,
      stack: error.stack ?? "",
    };
  }
  return { name: typeof error, message: String(error), code: null, stack: "" };
}

const handlerModule = await import(pathToFileURL(resolve(modulePath)).href);
if (typeof handlerModule.handler !== "function") {
  throw new Error(`${modulePath} exports no function named handler`);
}

// The fields of Lambda's Node.js context object that handlers commonly read.
function makeContext(options, timeoutMillis) {
  const deadline = Date.now() + timeoutMillis;
  return {
    awsRequestId: options.awsRequestId ?? randomUUID(),
    functionName: options.functionName ?? "serverless-guide-handler",
    functionVersion: "$LATEST",
    memoryLimitInMB: "128",
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, deadline - Date.now()),
  };
}

// Starts the handler synchronously, so that a caller thawing from a freeze begins the
// invocation before the event loop reads any socket.
function invoke(request) {
  const options = request.context ?? {};
  const timeoutMillis = options.timeoutMillis ?? DEFAULT_TIMEOUT_MILLIS;
  const context = makeContext(options, timeoutMillis);

  let running;
  try {
    running = Promise.resolve(handlerModule.handler(request.event, context));
  } catch (error) {
    running = Promise.reject(error);
  }
  const outcome = running.then(
    (result) => ({ result }),
    (error) => ({ error: describeError(error) }),
  );

  // The invocation is reported as failed at the deadline, as Lambda reports a timeout,
  // but the handler's promise keeps running in this process.
  let timer;
  const deadline = new Promise((settle) => {
    timer = setTimeout(() => {
      const message = `the handler did not finish within ${timeoutMillis} ms`;
      settle({ error: { name: "TimeoutError", message, code: null, stack: "" } });
    }, timeoutMillis);
  });

  return Promise.race([outcome, deadline]).then((settled) => {
    clearTimeout(timer);
    return { requestId: context.awsRequestId, ...settled };
  });
}

// Blocks the event loop until the file at `path` exists, so no I/O is handled meanwhile.
function freezeUntil(path) {
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  const giveUpAt = Date.now() + MAX_FREEZE_MILLIS;
  while (!existsSync(path)) {
    if (Date.now() > giveUpAt) {
      return false;
    }
    Atomics.wait(sleeper, 0, 0, FREEZE_POLL_MILLIS);
  }
  return true;
}

function readPoolStats() {
  if (typeof handlerModule.getPool !== "function") {
    return null;
  }
  const pool = handlerModule.getPool();
  return {
    totalCount: pool.totalCount,
    idleCount: pool.idleCount,
    waitingCount: pool.waitingCount,
  };
}

function sendOutcome(id, pending) {
  pending.then(
    (outcome) => reply({ id, ...outcome }),
    (error) => reply({ id, failure: describeError(error).message }),
  );
}

function handleRequest(request) {
  const { id, op } = request;
  if (op === "invoke") {
    if (request.freezeUntil) {
      reply({ id, frozen: true });
      if (!freezeUntil(request.freezeUntil)) {
        reply({ id, failure: `no thaw file appeared within ${MAX_FREEZE_MILLIS} ms` });
        return;
      }
    }
    sendOutcome(id, invoke(request));
  } else if (op === "invoke_batch") {
    const started = request.invocations.map((invocation) => invoke(invocation));
    sendOutcome(id, Promise.all(started).then((results) => ({ results })));
  } else if (op === "pool_stats") {
    reply({ id, stats: readPoolStats() });
  } else {
    reply({ id, failure: `unknown op ${JSON.stringify(op)}` });
  }
}

async function endPool() {
  if (typeof handlerModule.getPool !== "function") {
    return;
  }
  try {
    let timer;
    const timeout = new Promise((settle) => {
      timer = setTimeout(settle, POOL_END_TIMEOUT_MILLIS);
    });
    await Promise.race([handlerModule.getPool().end(), timeout]);
    clearTimeout(timer);
  } catch (error) {
    console.error(`ending the pool at shutdown failed: ${error.message}`);
  }
}

const requests = createInterface({ input: process.stdin, crlfDelay: Infinity });
requests.on("line", (line) => {
  let request;
  try {
    request = JSON.parse(line);
  } catch (error) {
    reply({ id: null, failure: `a request is not JSON: ${error.message}` });
    return;
  }
  try {
    handleRequest(request);
  } catch (error) {
    reply({ id: request.id, failure: describeError(error).message });
  }
});
requests.on("close", async () => {
  await endPool();
  process.exit(0);
});

reply({ ready: true });
