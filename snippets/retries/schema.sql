CREATE TABLE IF NOT EXISTS accounts (
    id INT PRIMARY KEY,
    balance INT NOT NULL CHECK (balance >= 0)
);

-- One row per applied transfer. The request id is the key, so a request that is
-- delivered or attempted twice finds its row and moves no money the second time.
CREATE TABLE IF NOT EXISTS transfers (
    request_id TEXT PRIMARY KEY,
    source INT NOT NULL REFERENCES accounts (id),
    target INT NOT NULL REFERENCES accounts (id),
    amount INT NOT NULL CHECK (amount > 0),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
