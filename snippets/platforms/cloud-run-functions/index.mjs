// A Cloud Run function (Node.js) that stores the body's {"message": "..."} as one row of the
// events table, through a pool kept across requests. Deploy with the entry point storeEvent.
// The pool opens at most DATABASE_POOL_SIZE connections: set it to the function's concurrency.
import { randomUUID } from "node:crypto";

import * as functions from "@google-cloud/functions-framework";
import pg from "pg";

const MAX_BODY_BYTES = 16 * 1024;
const MAX_MESSAGE_CHARACTERS = 1000;
const MAX_POOL_SIZE = 100;

const INSERT_EVENT = "INSERT INTO events (request_id, message) VALUES ($1, $2) RETURNING id";

// Module scope lives as long as the instance, so every request it serves reuses this pool.
let pool;

function poolSize() {
  const text = process.env.DATABASE_POOL_SIZE ?? "1";
  const size = /^[0-9]+$/.test(text) ? Number(text) : 0;
  if (size < 1 || size > MAX_POOL_SIZE) {
    throw new Error(
      `DATABASE_POOL_SIZE is "${text}": set it to the function's concurrency, ` +
        `a whole number from 1 to ${MAX_POOL_SIZE}`,
    );
  }
  return size;
}

function createPool() {
  const connectionString = process.env.DATABASE_URL;
  if (!connectionString) {
    throw new Error(
      "DATABASE_URL is not set. Set it to your cluster's connection string, " +
        "postgresql://USER:PASSWORD@HOST:26257/DATABASE?sslmode=verify-full",
    );
  }

  const created = new pg.Pool({
    connectionString,
    // One connection per request that the instance runs at once.
    max: poolSize(),
    maxLifetimeSeconds: 1800,
    connectionTimeoutMillis: 5000,
    // 0 turns off pg-pool's idle timer. Between requests Cloud Run may give the instance no
    // CPU, and a timer that fires late could close a connection a request is about to use.
    idleTimeoutMillis: 0,
  });

  // pg-pool emits 'error' when the connection of an idle client fails, such as when the
  // server ends it. Without a listener, Node.js treats it as uncaught and the instance exits.
  created.on("error", (error) => {
    console.error(`database pool: idle connection closed: ${error.message}`);
  });
  return created;
}

function getPool() {
  if (pool === undefined) {
    pool = createPool();
  }
  return pool;
}

function logClientError(error) {
  console.error(`database connection failed while checked out: ${error.message}`);
}

async function connect() {
  const client = await getPool().connect();
  client.on("error", logClientError);
  return client;
}

function release(client, error) {
  client.off("error", logClientError);
  // With an error, pg-pool destroys the client instead of keeping it for reuse.
  client.release(error);
}

// pg-pool hands out an idle client without testing it, and a connection the server closed
// while the instance had no CPU looks idle until used. A cheap query tests it first, and a
// broken client is replaced once.
async function checkOut() {
  const client = await connect();
  try {
    await client.query("SELECT 1");
    return client;
  } catch (error) {
    console.error(`database pool: replacing a broken connection: ${error.message}`);
    release(client, error);
  }
  return connect();
}

// A JSON string, or one of the characters that open, close or separate values.
const JSON_TOKEN = /"(?:[^"\\]|\\.)*"|[{}[\],:]/g;

// JSON.parse keeps the last of repeated keys, so this scans text that JSON.parse has
// accepted. Each open object has a Set of its keys, each open array a null.
function hasRepeatedKey(text) {
  const open = [];
  let expectingKey = false;
  for (const [token] of text.matchAll(JSON_TOKEN)) {
    const scope = open.at(-1);
    if (token === "{") {
      open.push(new Set());
      expectingKey = true;
    } else if (token === "[") {
      open.push(null);
    } else if (token === "}" || token === "]") {
      open.pop();
      expectingKey = false;
    } else if (token === ",") {
      expectingKey = scope instanceof Set;
    } else if (token === ":") {
      expectingKey = false;
    } else if (expectingKey) {
      const key = JSON.parse(token);
      if (scope.has(key)) {
        return true;
      }
      scope.add(key);
      expectingKey = false;
    }
  }
  return false;
}

// Returns { message } from a valid request, or { status, reason } to reject it with.
function readMessage(request) {
  // The Functions Framework keeps the unparsed body as a Buffer in rawBody.
  const body = request.rawBody ?? Buffer.alloc(0);
  if (body.length > MAX_BODY_BYTES) {
    return { status: 413, reason: `the body is larger than ${MAX_BODY_BYTES} bytes` };
  }
  if (body.length === 0) {
    return { status: 400, reason: "the request has no body" };
  }

  let text;
  let payload;
  try {
    // A fatal decoder rejects bytes that are not UTF-8 instead of replacing them.
    text = new TextDecoder("utf-8", { fatal: true }).decode(body);
    payload = JSON.parse(text);
  } catch {
    return { status: 400, reason: "the body is not JSON, or repeats a key" };
  }
  if (hasRepeatedKey(text)) {
    return { status: 400, reason: "the body is not JSON, or repeats a key" };
  }

  const message = payload?.message;
  if (typeof message !== "string" || message.trim().length === 0) {
    return { status: 400, reason: '"message" must be a non-empty string' };
  }
  // PostgreSQL rejects the NUL character in text values.
  if (message.includes("\u0000")) {
    return { status: 400, reason: '"message" must not contain the NUL character' };
  }
  // Counts code points, as PostgreSQL's char_length() does.
  if ([...message].length > MAX_MESSAGE_CHARACTERS) {
    return {
      status: 400,
      reason: `"message" is longer than ${MAX_MESSAGE_CHARACTERS} characters`,
    };
  }
  if (!message.isWellFormed()) {
    return { status: 400, reason: '"message" must not contain lone surrogates' };
  }
  return { message };
}

functions.http("storeEvent", async (request, response) => {
  if (request.method !== "POST") {
    response.set("allow", "POST").status(405).json({ error: "use POST" });
    return;
  }
  const { message, status, reason } = readMessage(request);
  if (reason !== undefined) {
    response.status(status).json({ error: reason });
    return;
  }

  const client = await checkOut();
  let failure;
  try {
    // A single statement outside a transaction block is committed when it completes.
    const inserted = await client.query(INSERT_EVENT, [randomUUID(), message]);
    response.status(201).json({ id: inserted.rows[0].id });
  } catch (error) {
    // The client may be broken or inside a failed transaction, so it is not reused.
    failure = error;
    throw error;
  } finally {
    release(client, failure);
  }
});
