// The little Markdown that chat answers use, rendered as DOM nodes: fenced code, headings, lists,
// paragraphs; `code`, **bold** and *italics* inline. Text only ever becomes text nodes (never
// innerHTML), so whatever a model writes, HTML included, is shown and never run.

const FENCE = /^\s*```/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const ITEM = /^\s*([-*+]|\d{1,3}[.)])\s+/;
const INLINE = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*[^*\s][^*\n]*\*)/g;

function node(tag, className) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  return element;
}

function inline(parent, text) {
  let at = 0;
  for (const match of text.matchAll(INLINE)) {
    parent.append(text.slice(at, match.index));
    const token = match[0];
    const [tag, cut] = token.startsWith("`") ? ["code", 1] : token.startsWith("**") ? ["strong", 2] : ["em", 1];
    const element = node(tag);
    element.textContent = token.slice(cut, -cut);
    parent.append(element);
    at = match.index + token.length;
  }
  parent.append(text.slice(at));
  return parent;
}

const startsBlock = (line) => FENCE.test(line) || HEADING.test(line) || ITEM.test(line);

export function renderMarkdown(container, text) {
  const blocks = [];
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (FENCE.test(line)) {
      const body = [];
      for (i += 1; i < lines.length && !FENCE.test(lines[i]); i += 1) body.push(lines[i]);
      i += 1; // the closing fence, or the end of an answer still streaming
      const pre = node("pre", "md-code");
      pre.append(node("code"));
      pre.firstChild.textContent = body.join("\n");
      blocks.push(pre);
    } else if (HEADING.test(line)) {
      const [, hashes, title] = line.match(HEADING);
      blocks.push(inline(node(`h${Math.min(hashes.length + 2, 6)}`, "md-heading"), title));
      i += 1;
    } else if (ITEM.test(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = node(ordered ? "ol" : "ul");
      if (ordered) list.start = Number.parseInt(line.trim(), 10);
      for (; i < lines.length && ITEM.test(lines[i]) && /^\s*\d/.test(lines[i]) === ordered; i += 1) {
        list.append(inline(node("li"), lines[i].replace(ITEM, "")));
      }
      blocks.push(list);
    } else if (!line.trim()) {
      i += 1;
    } else {
      const paragraph = [];
      for (; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i += 1) {
        paragraph.push(lines[i]);
      }
      blocks.push(inline(node("p"), paragraph.join("\n")));
    }
  }
  container.replaceChildren(...blocks);
}
