// openai-node's runTools helper against OCP: it calls the local function for each tool call
// and sends the results back until the model answers. Prints {content, calls} as JSON.
// Usage: node run_tools.mjs BASE_URL STREAM(0|1); NODE_PATH-style: OPENAI_NODE names node_modules.
const { default: OpenAI } = await import(process.env.OPENAI_NODE + "/openai/index.mjs");
const [baseURL, stream] = process.argv.slice(2);
const client = new OpenAI({ apiKey: "not-needed", baseURL, maxRetries: 0 });
const calls = [];
const runner = client.chat.completions.runTools({
  model: "sonnet",
  stream: stream === "1",
  messages: [{ role: "user", content: "What is the weather in Oslo, and the time?" }],
  tools: [
    { type: "function", function: { name: "get_weather", description: "Weather in a city",
      parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
      parse: JSON.parse, function: async ({ city }) => { calls.push(["get_weather", city]); return `cold in ${city}`; } } },
    { type: "function", function: { name: "get_time", description: "The time now",
      parameters: { type: "object", properties: {} },
      function: async () => { calls.push(["get_time"]); return "noon"; } } },
  ],
});
const content = await runner.finalContent();
console.log(JSON.stringify({ content, calls }));
