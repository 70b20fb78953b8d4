// Must NOT compile: each line below is a misuse the types catch.
import { Client } from "@fanout/client";

const c = new Client({ url: "ws://x/ws", token: "t" });
c.join(5);                                   // room is a string
c.on("gap", (g) => g.text);                  // a gap has no text
c.say("r", 42);                              // payload: string or Uint8Array
new Client({ url: "ws://x/ws", backoffMinMs: "1" });  // a number
