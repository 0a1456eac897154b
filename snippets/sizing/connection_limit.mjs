// Tell a connection refused at the server's connection limit from other failures, by the
// SQLSTATE the server sent, and name what to change.

// too_many_connections. PostgreSQL sends it when max_connections or a database's or role's
// CONNECTION LIMIT is reached; CockroachDB when server.max_connections_per_gateway is.
export const TOO_MANY_CONNECTIONS = "53300";

export class ConnectionLimitReached extends Error {
  constructor(cause) {
    super(
      `the database refused a new connection at its connection limit (SQLSTATE ` +
        `${TOO_MANY_CONNECTIONS}: ${cause.message}). Lower this function's maximum ` +
        "concurrency (reserved concurrency on AWS Lambda) or its pool max until the sum " +
        "over all functions of instances × pool max, plus other clients, fits the limit.",
      { cause },
    );
    this.name = "ConnectionLimitReached";
  }
}

// Runs one parameterized query on a pg.Pool. The pool opens connections on demand, so a
// refusal surfaces here, as the error node-postgres built from the server's message.
export async function query(pool, text, values = []) {
  try {
    return await pool.query(text, values);
  } catch (error) {
    if (error.code === TOO_MANY_CONNECTIONS) {
      throw new ConnectionLimitReached(error);
    }
    throw error;
  }
}
